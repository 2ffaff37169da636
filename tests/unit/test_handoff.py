"""What leaves the tool: file modes a teammate can read, the model card, the export's dtype and
tokenizer limits, and `predict`, which keeps the user's fields and scores gold labels. (The
exports of real runs, loaded with plain transformers, are checked in tests/integration/test_quickstart.py.)"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from dist_train import owned
from dist_train.checkpoint.card import card_text
from dist_train.checkpoint.export import export_dtype, trained_limits
from dist_train.tasks import TASK_FILE, build_task
from dist_train.tasks.predict import predict_file
from tests.unit.test_tasks import SPEC


def test_outputs_get_the_modes_a_plain_write_would(tmp_path):
    tmp = owned.temp_beside(tmp_path / "out")
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "model.safetensors").write_bytes(b"x")
    os.chmod(tmp / "sub" / "model.safetensors", 0o600)  # as transformers writes it
    owned.replace(tmp, tmp_path / "out", "export")
    mask = owned.umask()
    assert mask == os.umask(mask)  # read without changing it
    assert stat.S_IMODE((tmp_path / "out" / "sub" / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o777 & ~mask


def test_export_dtype_and_the_tokenizer_limits_follow_the_stage():
    assert export_dtype("auto", 10**9) == torch.float32 and export_dtype("auto", 10**9 + 1) == torch.bfloat16
    assert export_dtype("float16", 10) == torch.float16
    meta = {"stage": "finetune", "config": {"finetune": {"task": "sft", "data": {"max_length": 96}}}}
    assert trained_limits(meta) == (96, "left")  # SFT kept the end of a long prompt
    meta = {"stage": "pretrain", "config": {"pretrain": {"data": {"seq_len": 128}}}}
    assert trained_limits(meta) == (128, "right")
    assert trained_limits({"stage": "pretrain", "config": {}}) == (None, "right")  # an odd meta.json: no limit


def test_the_model_card_says_where_the_model_came_from_and_how_it_scored():
    meta = {"stage": "finetune", "tag": "step_00000100", "step": 100, "world_size": 2, "git_revision": "abc123",
            "eval": {"accuracy": 0.81, "loss": 0.52},
            "task": {"name": "sequence_classification", "examples": {"train": 800, "validation": 100, "test": 97}},
            "config": {"seed": 3, "model": {"name_or_path": "org/base"},
                       "finetune": {"init_from": "runs/x/pretrain/export", "task": "sequence_classification",
                                    "data": {"train": "t.jsonl", "test": "test.jsonl", "max_length": 96},
                                    "train": {"max_steps": 100, "global_batch_size": 32},
                                    "deepspeed": {"precision": "bf16", "zero_stage": 2}}}}
    text = card_text(meta, "runs/x/finetune/export", test={"accuracy": 0.79, "examples": 97.0})
    assert text.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    for needle in ("# The finetune export of the dist-train run x", "| starting model | runs/x/pretrain/export",
                   "| checkpoint | step_00000100 (step 100 of 100) |", "| max length | 96 tokens",
                   "| examples | train 800, validation 100, test 97 |", "| evaluation at this checkpoint | "
                   "accuracy 0.81, loss 0.52 |", "| test set (this export) | accuracy 0.79, examples 97 |",
                   'AutoModelForSequenceClassification.from_pretrained("runs/x/finetune/export")',
                   "dist-train predict"):
        assert needle in text, needle
    plan = {"corpora": [{"root": "/d/shards", "samples": 2048, "documents": 300, "manifest_sha256": "f" * 64}]}
    pre = card_text({**meta, "stage": "pretrain", "task": None, "plan": plan, "config": {
        **meta["config"], "pretrain": {"objective": "masked_lm", "data": {"seq_len": 128},
                                       "train": {"max_steps": 100, "global_batch_size": 16}}}}, "r/pretrain/export")
    assert "pipeline_tag: fill-mask" in pre and "| tokens trained | 204,800 |" in pre
    assert "| data | /d/shards: 2048 samples of 128 tokens, 300 documents, manifest sha256 ffffffffffffffff…" in pre
    card_text({"stage": None, "config": None}, "x")  # a damaged meta.json still gives a card, not a traceback


@pytest.fixture
def classifier(tmp_path, tokenizer_dir):
    """A real (tiny, untrained) fine-tune export: weights, tokenizer, task file."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    task = build_task("sequence_classification", SPEC, tok, [{"text": "a", "label": "news"},
                                                             {"text": "b", "label": "sports"}])
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2, id2label=dict(enumerate(task.labels)), label2id={k: i for i, k in enumerate(task.labels)}))
    export = tmp_path / "export"
    model.save_pretrained(export)
    tok.save_pretrained(export)
    (export / TASK_FILE).write_text(json.dumps({"name": task.name, "peft_task_type": task.peft_task_type, **SPEC,
                                                **task.describe()}))
    return export


def test_predict_keeps_every_field_and_scores_gold_labels(tmp_path, classifier):
    rows = [{"id": i, "text": f"some words {i}", "label": "news" if i % 2 else "sports", "source": "s"}
            for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n, metrics = predict_file(str(classifier), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), 2)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == 5 and [{k: o[k] for k in ("id", "text", "label", "source")} for o in out] == rows
    assert all(o["pred_label"] in ("news", "sports") and set(o["pred_probabilities"]) == {"news", "sports"}
               for o in out)
    accuracy = sum(o["pred_label"] == o["label"] for o in out) / 5
    assert metrics is not None and metrics["accuracy"] == pytest.approx(accuracy)
    # without gold labels: predictions only, no metrics
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    n, metrics = predict_file(str(classifier), str(tmp_path / "bare.jsonl"), str(tmp_path / "bare_out.jsonl"))
    assert metrics is None and all("label" not in json.loads(line) and "pred_label" in json.loads(line)
                                   for line in (tmp_path / "bare_out.jsonl").read_text().splitlines())


def test_a_fine_tune_alone_needs_only_init_from(tmp_path, classifier, capsys):
    """No model section: the directory in finetune.init_from gives weights, config and tokenizer; validate
    also says how many epochs max_steps means and what a missing test split costs."""
    import yaml

    from dist_train.cli import main

    rows = [{"text": f"words {i}", "label": "news" if i % 2 else "sports"} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "ray": {"num_workers": 2},
        "finetune": {"init_from": str(classifier), "task": "sequence_classification",
                     "data": {"train": str(tmp_path / "train.jsonl"), "validation_fraction": 0.2},
                     "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 4, "eval_every": 50}}}))
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out
    (counts,) = [ln for ln in out.splitlines() if ln.startswith("finetune: ") and "train," in ln]
    train = int(counts.split()[1])
    assert counts.endswith(f"max_steps=10 × 8 examples per step = 80 examples, {80 / train:.2f} epochs")
    assert "finetune: no test data" in out and "finetune.train.eval_every=50 is beyond max_steps=10" in out


def test_every_flag_is_explained_and_the_exit_codes_are_listed(capsys):
    import argparse

    from dist_train.cli import _parser, main

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    silent = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers(_parser()) for a in p._actions
              if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not silent, silent
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("dist-train 0.")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"  {code} " in text for code in ("0", "1", "2", "75", "130"))


def test_validate_and_data_inspect_speak_json(tmp_path, shards_dir, capsys):
    """Numbers as numbers for scripts; a refused config is JSON on stdout too (and one line on stderr)."""
    import yaml

    from dist_train.cli import main

    assert main(["data", "inspect", str(shards_dir), "--json", "--samples", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["seq_len"] == 32 and shown["samples"] == shown["tokens"] // 32 and len(shown["samples_shown"]) == 2
    assert len(shown["samples_shown"][0]["tokens"]) == 32 and isinstance(shown["samples_shown"][0]["text"], str)
    assert len(shown["manifest_sha256"]) == 64
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "ray": {"num_workers": 2},
        "model": {"tokenizer": json.loads((shards_dir / "manifest.json").read_text())["tokenizer"]["name_or_path"],
                  "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "pretrain": {"data": {"shards": str(shards_dir), "seq_len": 32},
                     "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}}}))
    assert main(["validate", str(config), "--json"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["ok"] is True and ok["stages"]["pretrain"]["grad_accum"] == 1 and ok["stages"]["pretrain"]["lanes"] == 2
    assert any(n.startswith("pretrain data: ") for n in ok["notes"])
    assert main(["validate", str(config), "--json", "pretrain.train.global_batch_size=3"]) == 2
    out, err = capsys.readouterr()
    refused = json.loads(out)
    assert refused["ok"] is False and "global_batch_size=3" in refused["error"] and err.count("\n") == 1


def test_predict_reads_text_lines_stdin_and_other_field_names(tmp_path, classifier, monkeypatch, capsys):
    import io

    from dist_train.cli import main

    (tmp_path / "texts.txt").write_text("first text\n\nsecond text\n")
    assert main(["predict", str(classifier), "--input", str(tmp_path / "texts.txt")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["first text", "second text"] and all("pred_label" in r for r in rows)
    # JSON lines on stdin, with the user's own field names
    monkeypatch.setattr("sys.stdin", io.StringIO('{"body": "a b", "gold": "news"}\n{"body": "c", "gold": "sports"}\n'))
    assert main(["predict", str(classifier), "--input", "-", "--text-field", "body", "--label-field", "gold"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["gold"] for r in rows] == ["news", "sports"] and "metrics on the 2 records' gold labels" in err
    monkeypatch.setattr("sys.stdin", io.StringIO('{"body": "a b"}\n'))
    assert main(["predict", str(classifier), "--input", "-"]) == 2  # the training name, text, is not there
    assert "no field 'text' (the name the fine-tune used): name your field" in capsys.readouterr().err
