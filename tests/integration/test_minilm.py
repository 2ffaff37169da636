"""Domain adaptation of a real pretrained encoder (all-MiniLM-L6-v2) with masked LM, then a
classifier, through real Ray Train and DeepSpeed (the configs/minilm_domain.yaml example, shortened)."""

import json

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration


def test_minilm_mlm_then_classification(tmp_path, minilm_dir):
    res = run_cli("run", str(REPO / "configs" / "minilm_domain.yaml"), "output_dir=run",
                  "pretrain.train.max_steps=8", "pretrain.train.eval_every=8", "pretrain.train.save_every=8",
                  "finetune.train.max_steps=8", "finetune.train.eval_every=8", "finetune.train.save_every=8",
                  cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    pre, ft = report["stages"]["pretrain"], report["stages"]["finetune"]
    assert report["config"]["pretrain"]["objective"] == "mlm" and pre["steps"] == 8
    assert pre["eval"]["loss"] < 10.3  # ln(30522): the masked-LM head predicts better than chance
    assert ft["test"]["accuracy"] > 0

    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    assert type(AutoModelForMaskedLM.from_pretrained(pre["export_dir"])).__name__ == "BertForMaskedLM"
    assert AutoModelForSequenceClassification.from_pretrained(ft["export_dir"]).config.num_labels == 6
