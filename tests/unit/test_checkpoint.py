"""The commit protocol's pure parts: what counts as committed, and checksum verification."""

import json

from dist_train.checkpoint.manager import META, checksums, committed_tags, latest_committed, verify_files, write_atomic


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
