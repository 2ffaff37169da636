"""Domain adaptation of a real pretrained encoder (all-MiniLM-L6-v2) with masked LM, then a
classifier, through real Ray Train and DeepSpeed (the configs/minilm_domain.yaml example, shortened)."""

import json

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration


def test_minilm_mlm_then_classification(tmp_path, minilm_dir):
    """The checkpoint has no masked-LM head: it is named, warmed up alone (8 // 2 = 4 steps), and the
    evaluation that ends the warm-up is the "before" of every set. (compare_base is tested elsewhere.)"""
    res = run_cli("run", str(REPO / "configs" / "minilm_domain.yaml"), "output_dir=run",
                  "pretrain.train.max_steps=8", "pretrain.train.eval_every=8", "pretrain.train.save_every=8",
                  "pretrain.eval.samples=32", "finetune.compare_base=false",
                  "finetune.train.max_steps=8", "finetune.train.eval_every=8", "finetune.train.save_every=8",
                  cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    pre, ft = report["stages"]["pretrain"], report["stages"]["finetune"]
    assert report["config"]["pretrain"]["objective"] == "mlm" and pre["steps"] == 8
    assert pre["eval"]["loss"] < 10.3  # ln(30522): the masked-LM head predicts better than chance
    assert "so initialised at random: cls.predictions.bias" in res.stdout
    assert "only they train for the first 4 steps" in res.stdout
    assert pre["head_warmup_steps"] == 4 and "cls.predictions.transform.dense.weight" in pre["new_parameters"]
    adaptation = pre["adaptation"]
    assert adaptation["before_step"] == 4 and adaptation["after_step"] == 8
    domain = adaptation["sets"]["domain"]
    assert pre["baseline"]["domain/loss"] > 9.5, "step 0: a random head, about ln(30522)"
    assert domain["before"]["loss"] < pre["baseline"]["domain/loss"], "the warm-up trained the head"
    assert domain["after"]["loss"] == pytest.approx(pre["eval"]["loss"])
    assert ft["test"]["accuracy"] > 0
    (new,) = [ln for ln in res.stdout.splitlines() if "[finetune] not in" in ln]
    assert new.endswith("initialised at random: classifier.bias, classifier.weight"), "the pooler came along"

    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    assert type(AutoModelForMaskedLM.from_pretrained(pre["export_dir"])).__name__ == "BertForMaskedLM"
    assert AutoModelForSequenceClassification.from_pretrained(ft["export_dir"]).config.num_labels == 6


def test_minilm_token_classification_and_predict(tmp_path, minilm_dir):
    res = run_cli("run", str(REPO / "configs" / "minilm_ner.yaml"), "output_dir=run", "finetune.train.max_steps=12",
                  "finetune.train.eval_every=12", "finetune.train.save_every=12", "finetune.data.max_length=64",
                  cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ft = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]["finetune"]
    assert ft["task"] == "token_classification" and ft["labels"] == ["B-LITERAL", "B-MODULE", "O"]
    assert {"f1", "precision", "recall", "tag_accuracy"} <= ft["test"].keys()
    assert ft["test"]["tag_accuracy"] > 0.9  # "O" dominates: the head learned at least that
    rows = [json.loads(line) for line in
            (tmp_path / "data" / "python_docs_minilm" / "task" / "ner_test.jsonl").read_text().splitlines()[:4]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": r["tokens"]}) + "\n" for r in rows))
    res = run_cli("predict", ft["export_dir"], "--input", str(tmp_path / "in.jsonl"))
    assert res.returncode == 0, res.stderr[-2000:]
    preds = [json.loads(line) for line in res.stdout.splitlines()]
    assert [len(p["pred_tags"]) for p in preds] == [len(r["tokens"]) for r in rows]
