"""The benchmark harness: its command line, its verdicts against the goals, and that
docs/benchmarks.md is what the committed results render to (the figures themselves are measured
by `python -m bench all`, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_harness_lists_every_benchmark():
    res = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("all", "throughput", "finetune", "mfu", "data", "memory"):
        assert name in res.stdout


def test_docs_benchmarks_is_what_the_committed_results_render_to():
    from bench.__main__ import BENCHES

    doc = (REPO / "docs" / "benchmarks.md").read_text()
    for name, module_name in BENCHES.items():
        results = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
        module = __import__(module_name, fromlist=["markdown"])
        start, end = f"<!-- bench:{name} -->\n", f"\n<!-- /bench:{name} -->"
        assert start in doc, f"docs/benchmarks.md lacks the {name} section: run `python -m bench all`"
        shown = doc.split(start, 1)[1].split(end, 1)[0]
        assert shown == module.markdown(results).strip(), (
            f"docs/benchmarks.md's {name} section differs from bench/results/{name}.json: run "
            "`python -m bench all --render` (or `python -m bench all` to measure again)")


def _throughput(**over) -> dict:
    tps = {"dist_train": 1000.0, "torchrun_deepspeed": 1000.0, "hf_trainer_deepspeed": 900.0,
           "dist_train_loop_torchrun": 1050.0, "dist_train_1w": 550.0}
    r = {"machine": {"date": "2026-01-01", "cpu": "cpu", "cpu_count": 2, "torch": "2"}, "tokens_per_s": tps,
         "samples": {"dist_train": [{}]}, "flops_per_token": 1e8, "seq_len": 256, "micro_batch": 4, "params": 3e7,
         "ratio_vs_torchrun": 1.0, "ratio_vs_hf_trainer": 1.111, "loop_ratio_vs_torchrun": 1.05, "ray_ratio": 0.95,
         "weak_scaling_efficiency": 0.9, "mfu_dist_train": 0.5, "peak_flops_per_worker": 2e11,
         "loader_tokens_per_s_per_rank": 1e6, "loader_headroom": 2000.0, "data_wait_frac": 0.001,
         "cpu_share": {"workers_cores": 1.8, "ray_and_driver_cores": 0.1}}
    r.update(over)
    return r


def test_throughput_verdicts_follow_the_goals():
    from bench.throughput import markdown

    text = markdown(_throughput())
    assert "| dist_train ÷ plain torchrun + DeepSpeed | 1.000 | ≥ 0.98 | **met** |" in text
    assert "| dist_train ÷ HF Trainer + DeepSpeed | 1.111 | ≥ 1.10 | **met** |" in text
    text = markdown(_throughput(ratio_vs_torchrun=0.97, ratio_vs_hf_trainer=1.05, mfu_dist_train=0.44))
    assert "| 0.970 | ≥ 0.98 | **not met** |" in text and "| 1.050 | ≥ 1.10 | **not met** |" in text
    assert "| 44.0% | ≥ 45% | **not met** |" in text


def test_a_ratio_is_claimed_only_when_its_interval_clears_the_goal():
    from bench.stats import ratio_of_medians

    fast, slow = [120.0, 118.0, 125.0, 121.0, 119.0], [100.0, 101.0, 99.0, 102.0, 98.0]
    r = ratio_of_medians(fast, slow)
    assert r.value == pytest.approx(120 / 100) and r.low <= r.value <= r.high
    assert r.verdict(1.10) == "met" and r.verdict(1.30) == "not met"
    noisy = ratio_of_medians([80.0, 130.0, 125.0], [100.0, 101.0, 99.0])
    assert noisy.low < 1.0 < noisy.high and noisy.verdict(1.0) == "not distinguishable"
    assert ratio_of_medians(fast, slow) == r  # deterministic: the same runs give the same interval
    single = ratio_of_medians([110.0], [100.0])
    assert single.low == single.high == single.value  # one run each: a point, no claim of spread
    with pytest.raises(ValueError, match="at least one run"):
        ratio_of_medians([], slow)


def test_finetune_table_states_runs_intervals_and_padding():
    from bench.finetune import ARCH, SYSTEMS, markdown, summarise

    samples = {"dist_train": [300.0, 310.0, 305.0], "dist_train_ungrouped": [200.0, 210.0, 190.0],
               "hf_trainer": [180.0, 190.0, 185.0], "hf_trainer_grouped": [250.0, 300.0, 230.0]}
    task = {**summarise(samples, {"grouped": 0.93, "shuffled": 0.41}), "steps": 50}
    assert task["ratios"]["hf_trainer"]["verdict"] == "met"  # 305 / 185 ≥ 1.5
    assert task["ratios"]["hf_trainer_grouped"]["verdict"] == "not distinguishable"
    assert task["ratios"]["dist_train_ungrouped"]["verdict"] is None  # no goal: what grouping buys
    r = {"machine": {"date": "2026-01-01", "cpu": "cpu", "cpu_count": 2, "torch": "2"}, "tasks": {"sft": task},
         "repeats": 3, "warmup_steps": 2, "global_batch": 32, "micro_batch": 8, "workers": 2,
         "arch": ARCH}
    text = markdown(r)
    assert "| 300, 310, 305 |" in text and "93% length-grouped, 41% shuffled" in text
    assert text.count("**met**") == 1 and "**not distinguishable**" in text and len(SYSTEMS) == 4
    assert "| what grouping buys |" in text


def test_the_padding_share_comes_from_the_workers_plan(tmp_path, task_dir, tokenizer_dir):
    """Grouping by length raises the share of computed positions that are real tokens, measured with the
    plan functions the workers use (on the quickstart's classification task)."""
    from bench.finetune import padding_shares

    data = tmp_path / "data"
    data.mkdir()
    (data / "task").symlink_to(task_dir)
    (data / "tokenizer").symlink_to(tokenizer_dir)
    shares, steps = padding_shares(tmp_path, data, "classification")
    assert steps == len((task_dir / "train.jsonl").read_text().splitlines()) // 32
    assert 0 < shares["shuffled"] < shares["grouped"] <= 1, shares


def test_variants_change_one_thing_each():
    from bench.mfu import VARIANTS, _merge

    base = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 25_000_000},
            "optimizer": {"params": {"torch_adam": True, "fused": True, "lr": 1e-3}}}
    ds_fused = _merge(base, VARIANTS["ds_fused_adam"][1]["ds"])
    assert ds_fused["optimizer"]["params"] == {"torch_adam": False, "lr": 1e-3}  # None removes the key
    assert _merge(base, VARIANTS["small_buckets"][1]["ds"])["zero_optimization"] == {"stage": 2,
                                                                                      "reduce_bucket_size": 512**2}
    assert base["optimizer"]["params"]["fused"] is True  # the defaults are not modified


def test_the_peers_train_on_the_rows_dist_train_built(shards_dir):
    from bench.peers.common import token_rows
    from dist_train.data.manifest import read_manifest

    man = read_manifest(shards_dir)
    rows = token_rows(str(shards_dir))
    assert rows.shape == (sum(s.samples for s in man.train), man.seq_len) and rows.dtype == np.int64


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_says_in_one_json_line_that_it_needs_a_gpu():
    res = subprocess.run(["bash", "bench/gpu_check.sh"], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert res.returncode == 2
    assert json.loads(res.stdout.strip()) == {"error": "no CUDA GPU visible: run bench/gpu_check.sh on a GPU machine"}
