"""Elastic resume through real Ray Train: 2 -> 1 -> 4 workers on one plan, proven by the ledger."""

import json

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration


def test_two_one_four_workers_follow_one_plan_exactly_once(tmp_path):
    base = [str(REPO / "configs" / "quickstart.yaml"), "output_dir=run", "finetune=null",
            "pretrain.data.lanes=4", "pretrain.train.global_batch_size=32", "pretrain.train.micro_batch_size=4",
            "pretrain.train.save_every=6", "pretrain.train.eval_every=0", "pretrain.train.log_every=6",
            # the plan and the ledger are under test, not the model: a quarter of the quickstart's compute per token
            "model.arch.hidden_size=64", "model.arch.num_layers=2", "model.arch.intermediate_size=172"]
    for workers, steps in ((2, 12), (1, 24), (4, 40)):
        res = run_cli("run", *base, f"ray.num_workers={workers}", f"pretrain.train.max_steps={steps}", cwd=tmp_path,
                      timeout=600)
        assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
        stage = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]["pretrain"]
        assert stage["world_size"] == workers and stage["steps"] == steps
        if steps > 12:
            assert "written by" in res.stdout  # resumed, converting for the new worker count
    res = run_cli("ledger", "verify", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "40 steps, 1280 samples, 1 complete epochs, world sizes [1, 2, 4]" in res.stdout
    assert "duplicated 0, missing 0, off-plan steps 0" in res.stdout
