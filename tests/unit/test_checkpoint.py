"""The commit protocol's pure parts: what counts as committed, and checksum verification."""

import json
from pathlib import Path

import pytest

from dist_train.checkpoint.manager import META, checksums, committed_tags, latest_committed, verify_files, write_atomic
from dist_train.config.loader import ConfigError, load_config

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def make(root, tag, files, commit=True):
    d = root / tag
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    if commit:
        (d / META).write_text(json.dumps({"files": checksums(d)}))
    return d


def test_only_checkpoints_with_meta_are_committed(tmp_path):
    make(tmp_path, "step_00000005", {"a.pt": b"x" * 10})
    make(tmp_path, "step_00000007", {"a.pt": b"y"}, commit=False)  # crashed before its meta was written
    assert committed_tags(tmp_path) == ["step_00000005"]
    assert latest_committed(tmp_path) is None  # no pointer yet
    write_atomic(tmp_path / "latest", "step_00000007\n")
    assert latest_committed(tmp_path) is None  # the pointer names an uncommitted directory
    write_atomic(tmp_path / "latest", "step_00000005\n")
    assert latest_committed(tmp_path) == "step_00000005"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_checksums_catch_changed_missing_and_truncated_files(tmp_path):
    d = make(tmp_path, "step_00000001", {"a.pt": b"abc" * 100, "rng/rank_00000.cpu.npy": b"r"})
    assert verify_files(d) is None
    (d / "a.pt").write_bytes(b"abd" + b"abc" * 99)
    assert verify_files(d) == "a.pt does not match its recorded sha256"
    (d / "a.pt").write_bytes(b"abc" * 50)
    assert verify_files(d) == "a.pt does not match its recorded sha256"
    (d / "rng" / "rank_00000.cpu.npy").unlink()
    (d / "a.pt").write_bytes(b"abc" * 100)
    assert verify_files(d) == "rng/rank_00000.cpu.npy is missing"
    (d / META).write_text("{")
    assert verify_files(d).startswith("meta.json unreadable")


def test_retention_keeps_the_newest_and_the_best():
    from dist_train.checkpoint.manager import rank_checkpoints

    metas = {f"step_{s:08d}": {"eval": ev} for s, ev in
             [(10, {"loss": 3.0, "accuracy": 0.5}), (20, {"loss": 2.0, "accuracy": 0.7}),
              (30, {"loss": 2.5, "accuracy": 0.7}), (40, {}), (50, {"loss": 2.2, "accuracy": 0.6})]}
    kept, best = rank_checkpoints(metas, keep=2, metric="loss", higher=False)
    assert best == "step_00000020" and kept == {"step_00000040", "step_00000050", "step_00000020"}
    kept, best = rank_checkpoints(metas, keep=2, metric="accuracy", higher=True)
    assert best == "step_00000020", "a tie goes to the checkpoint that reached the value first"
    kept, best = rank_checkpoints(metas, keep=1, metric=None, higher=False)
    assert best is None and kept == {"step_00000050"}
    kept, best = rank_checkpoints({"step_00000010": {"eval": {"loss": float("nan")}}}, 1, "loss", False)
    assert best is None, "a NaN metric is never best"


def test_best_metric_is_checked_against_the_stage(tmp_path):
    from dist_train.config.checks import check_run, resolve

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "pretrain.train.best_metric=accuracy"])
    with pytest.raises(ConfigError, match=r"pretrain.train.best_metric='accuracy' is not a metric the pretrain "
                                          r"evaluation reports: use one of \['loss', 'perplexity', 'adapted_loss'\]"):
        check_run(resolve(cfg), ["pretrain"])
