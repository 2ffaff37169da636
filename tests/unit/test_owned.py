"""The deletion policy (dist_train/owned.py): dist-train removes or replaces only what it made, and every
command that writes a directory keeps to it. The reproductions of issue 18 (export, report, prepare.dir,
data build --overwrite, a pipe: command in a run file) each lose nothing of the user's here."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from dist_train import owned
from dist_train.cli import main
from tests.conftest import REPO
from tests.unit.test_observability import make_run


def user_folder(path: Path) -> Path:
    """A folder of someone's files, with a subfolder."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub" / "data.csv").write_text("a,b\n")
    return path


def untouched(path: Path) -> bool:
    return (path / "notes.txt").read_text() == "mine" and (path / "sub" / "data.csv").read_text() == "a,b\n"


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """`dist-train ARGS` in this process (the refusals here happen before anything heavy starts)."""

    def run(*argv: str, cwd: Path | None = None) -> Result:
        before = Path.cwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main([str(a) for a in argv])
        finally:
            os.chdir(before)
        return Result(code, capsys.readouterr().err)

    return run


def one_line_error(res) -> bool:
    return res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 \
        and "Traceback" not in res.stderr


# --- the policy ---------------------------------------------------------------------------------------------


def test_only_an_output_of_the_same_kind_is_replaced(tmp_path):
    dest = tmp_path / "out"
    first = owned.temp_beside(dest)
    (first / "a.txt").write_text("1")
    owned.replace(first, dest, "export")
    assert owned.kind_of(dest) == "export" and (dest / "a.txt").read_text() == "1"
    second = owned.temp_beside(dest)
    (second / "b.txt").write_text("2")
    owned.replace(second, dest, "export")
    assert sorted(p.name for p in dest.iterdir()) == [owned.OWNER, "b.txt"], "replaced whole, never a mix"
    with pytest.raises(owned.OwnershipError, match="a dist-train export, not a shard directory"):
        owned.check_output(dest, "shard directory")
    with pytest.raises(owned.OwnershipError, match="pass --overwrite"):
        owned.check_output(dest, "export", overwrite=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left"


def test_a_directory_it_did_not_make_is_never_removed(tmp_path):
    theirs = user_folder(tmp_path / "theirs")
    for call in (lambda: owned.remove(theirs, "export"), lambda: owned.check_output(theirs, "export"),
                 lambda: owned.replace(owned.temp_beside(theirs), theirs, "export")):
        with pytest.raises(owned.OwnershipError, match="not made by dist-train"):
            call()
    owned.discard(theirs)
    owned.discard(theirs, "export")
    assert untouched(theirs)
    (theirs / owned.OWNER).write_text("{not json")  # a damaged marker proves nothing
    with pytest.raises(owned.OwnershipError):
        owned.remove(theirs, "export")
    link = tmp_path / "link"
    link.symlink_to(theirs)
    with pytest.raises(owned.OwnershipError, match="not a directory"):
        owned.check_output(link, "export")
    assert untouched(theirs)
    with pytest.raises(owned.OwnershipError, match="not a directory dist-train made"):
        owned.replace(theirs, tmp_path / "new", "export")  # nor moved
    empty = tmp_path / "empty"
    empty.mkdir()
    owned.check_output(empty, "export")  # an empty directory is free
    owned.remove(empty, "export")
    assert not empty.exists()


def test_an_output_overlapping_an_input_is_refused(tmp_path):
    src = tmp_path / "data" / "corpus.jsonl"
    src.parent.mkdir()
    src.write_text("{}\n")
    for dest in (tmp_path / "data", tmp_path, src):
        with pytest.raises(owned.OwnershipError, match="overlap"):
            owned.check_output(dest, "shard directory", inputs=[src])
    owned.check_output(tmp_path / "elsewhere", "shard directory", inputs=[src])
    owned.check_output(src.parent / "beside", "shard directory", inputs=[src])


def test_no_other_module_deletes_or_replaces_a_directory():
    """Every rmtree goes through owned.py; the os.replace calls left rename single files."""
    files = {p.relative_to(REPO).as_posix(): p.read_text() for p in (REPO / "dist_train").rglob("*.py")}
    rmtree = [f for f, text in files.items() if "rmtree" in text and f != "dist_train/owned.py"]
    assert rmtree == []
    replacing = sorted(f for f, text in files.items() if re.search(r"os\.replace\(|\.rename\(", text))
    assert replacing == ["dist_train/data/build.py", "dist_train/data/ledger.py", "dist_train/data/packing.py",
                         "dist_train/faults.py", "dist_train/outputs.py", "dist_train/owned.py",
                         "dist_train/tasks/predict.py", "dist_train/train/heartbeat.py"], \
        "a new rename: route a directory through owned.py"


# --- the commands -------------------------------------------------------------------------------------------


def fake_checkpoint(stage_dir: Path) -> Path:
    """A committed checkpoint's directory layout (meta.json with no files): enough to reach the export's checks."""
    ckpt = stage_dir / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "tag": ckpt.name, "files": {}}))
    (stage_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


def test_export_never_deletes_a_folder_or_the_run_it_exports(run_cli, tmp_path):
    stage = tmp_path / "run" / "pretrain"
    ckpt = fake_checkpoint(stage)
    theirs = user_folder(tmp_path / "theirs")
    res = run_cli("export", str(ckpt), "--output", str(theirs))
    assert one_line_error(res) and "not made by dist-train" in res.stderr, res.stderr
    assert untouched(theirs)
    for dest in (stage, stage / "checkpoints", tmp_path / "run"):  # the stage folder itself, or above it
        res = run_cli("export", str(ckpt), "--output", str(dest))
        assert one_line_error(res) and "overlap" in res.stderr, res.stderr
    assert (ckpt / "meta.json").is_file()


def test_report_never_replaces_a_page_or_folder_of_the_users(run_cli, tmp_path):
    out = make_run(tmp_path, "run", "completed", 5, checkpoint=20, done=True)
    theirs = user_folder(out / "report")
    res = run_cli("report", str(out))
    assert one_line_error(res) and "plot directory" in res.stderr, res.stderr
    assert untouched(theirs) and not (out / "report.md").exists()
    for p in sorted(theirs.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (out / "report.md").write_text("# my own notes\n")
    res = run_cli("report", str(out), "--html")
    assert one_line_error(res) and "report.md" in res.stderr
    assert (out / "report.md").read_text() == "# my own notes\n" and not (out / "report.html").exists()
    (out / "report.md").unlink()
    assert run_cli("report", str(out), "--html").returncode == 0
    assert run_cli("report", str(out), "--html").returncode == 0, "its own pages and plots are replaced"
    assert owned.kind_of(out / "report") == "report plots"


def test_prepare_dir_of_the_users_is_refused_before_anything_is_built(run_cli, tmp_path):
    theirs = user_folder(tmp_path / "mydata")
    res = run_cli("validate", str(REPO / "configs" / "quickstart.yaml"), f"prepare.dir={theirs}",
                  f"output_dir={tmp_path / 'run'}")
    assert one_line_error(res) and "prepare.dir" in res.stderr and "not made by dist-train" in res.stderr
    res = run_cli("run", str(REPO / "configs" / "quickstart.yaml"), f"prepare.dir={theirs}",
                  f"output_dir={tmp_path / 'run'}")
    assert one_line_error(res) and untouched(theirs) and not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"], "nothing half-written beside it"


def test_data_build_overwrite_replaces_only_shards(run_cli, tmp_path, corpus_jsonl, tokenizer_dir):
    args = ("--tokenizer", str(tokenizer_dir), "--seq-len", "32", "--samples-per-shard", "200")
    ow = tmp_path / "ow"
    ow.mkdir()
    corpus = ow / "corpus.jsonl"
    corpus.write_bytes(corpus_jsonl.read_bytes())
    res = run_cli("data", "build", "--input", str(corpus), "--output", str(ow), "--overwrite", *args)
    assert one_line_error(res) and "overlap" in res.stderr and corpus.read_bytes() == corpus_jsonl.read_bytes()
    res = run_cli("data", "build", "--input", str(corpus), "--output", ".", "--overwrite", *args, cwd=ow)
    assert one_line_error(res) and corpus.is_file(), "--output . never empties the current directory"
    theirs = user_folder(tmp_path / "theirs")
    res = run_cli("data", "build", "--input", str(corpus), "--output", str(theirs), "--overwrite", *args)
    assert one_line_error(res) and "not made by dist-train" in res.stderr and untouched(theirs)
    shards = tmp_path / "shards"
    assert run_cli("data", "build", "--input", str(corpus), "--output", str(shards), *args).returncode == 0
    res = run_cli("data", "build", "--input", str(corpus), "--output", str(shards), *args)
    assert one_line_error(res) and "--overwrite" in res.stderr
    res = run_cli("data", "build", "--input", str(corpus), "--output", str(shards), "--overwrite", *args)
    assert res.returncode == 0 and owned.kind_of(shards) == "shard directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow", "shards", "theirs"], "no work directory left"


def test_shards_built_before_markers_can_still_be_overwritten(tmp_path, shards_dir):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(shards_dir, old, ignore=shutil.ignore_patterns(owned.OWNER))
    from dist_train.data.build import earlier_shards

    assert earlier_shards(old)
    owned.check_output(old, "shard directory", legacy=earlier_shards)
    (old / "notes.txt").write_text("mine")
    assert not earlier_shards(old), "anything else in it: not provably ours"


def test_ledger_verify_never_runs_a_command_from_a_run_file(run_cli, tmp_path):
    stage = tmp_path / "run" / "pretrain"
    ckpt = fake_checkpoint(stage)
    canary = tmp_path / "ran"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["plan"] = {"shards": f"pipe:touch {canary}_{{file}}", "mix": [], "lanes": 2, "global_batch": 4, "seed": 0,
                    "window_shards": 1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    res = run_cli("ledger", "verify", str(tmp_path / "run"))
    assert one_line_error(res) and "never runs a command" in res.stderr, res.stderr
    assert not list(tmp_path.glob("ran*")), "the command did not run"
