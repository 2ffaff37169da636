"""Every subcommand on damaged or hostile input: one line on stderr naming the problem and the fix, exit
status 2, no traceback, and nothing of the user's changed. docs/errors.md lists these (second table),
generated with test_bad_input's matrix (`python -m tests.unit.test_bad_input`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dist_train.cli import main


@dataclass(frozen=True)
class World:
    """What the commands are pointed at: real shards and tokenizer, a run with a committed checkpoint's files,
    a fine-tune export's task file, records to predict, a valid config."""

    tmp: Path
    shards: Path
    tok: Path
    run: Path
    ckpt: Path
    export: Path
    records: Path
    config: Path


@pytest.fixture
def world(tmp_path, shards_dir, tokenizer_dir) -> World:
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    run = tmp_path / "run"
    ckpt = run / "pretrain" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    plan = {"shards": str(shards), "mix": [], "lanes": 2, "global_batch": 4, "seed": 0, "window_shards": 1}
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "tag": ckpt.name, "files": {}, "plan": plan,
                                                "stage": "pretrain", "config": {}}))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    (run / "run.json").write_text(json.dumps({"state": "completed", "stage": "pretrain", "stages": ["pretrain"]}))
    export = tmp_path / "export"
    export.mkdir()
    (export / "task.json").write_text(json.dumps({"task": "sequence_classification", "labels": ["x", "y"]}))
    records = tmp_path / "in.jsonl"
    records.write_text('{"text": "a b c", "label": "x"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "ray": {"num_workers": 2},
        "model": {"tokenizer": str(tokenizer_dir), "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                            "intermediate_size": 64}},
        "pretrain": {"data": {"shards": str(shards), "seq_len": 32},
                     "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}}}))
    return World(tmp_path, shards, tokenizer_dir, run, ckpt, export, records, config)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def manifest(w: World, change: Callable[[dict], object]) -> None:
    man = json.loads((w.shards / "manifest.json").read_text())
    change(man)
    (w.shards / "manifest.json").write_text(json.dumps(man))


def meta(w: World, change: Callable[[dict], object]) -> None:
    m = json.loads((w.ckpt / "meta.json").read_text())
    change(m)
    (w.ckpt / "meta.json").write_text(json.dumps(m))


NOT_UTF8 = b"\xff\xfe\x00bad \x80\x81 bytes\n"


@dataclass(frozen=True)
class Cmd:
    """One mistake with one command: `argv(world)` makes it (writing what it needs), `message` is in the error."""

    command: str
    mistake: str
    argv: Callable[[World], list[str]]
    message: str


def build(w: World, *extra: str, input: str | None = None) -> list[str]:
    return ["data", "build", "--input", input or str(write(w.tmp / "c.jsonl", '{"text": "some words"}\n')),
            "--output", str(w.tmp / "built"), "--tokenizer", str(w.tok), "--seq-len", "32", *extra]


def plan(w: World, *extra: str) -> list[str]:
    return ["data", "plan", str(w.shards), "--global-batch", "4", "--world-size", "2", *extra]


def damaged_shard(w: World) -> list[str]:
    first = json.loads((w.shards / "manifest.json").read_text())["train"][0]["file"]
    data = (w.shards / first).read_bytes()
    (w.shards / first).write_bytes(data[: len(data) // 3])
    return ["data", "inspect", str(w.shards)]


CLI_CASES = [
    # data build
    Cmd("data build", "input file missing", lambda w: build(w, input=str(w.tmp / "nope.jsonl")), "nope.jsonl"),
    Cmd("data build", "input not UTF-8", lambda w: build(w, input=str(write(w.tmp / "bin.jsonl", NOT_UTF8))),
        "cannot be read"),
    Cmd("data build", "input with a line that is not JSON",
        lambda w: build(w, input=str(write(w.tmp / "half.jsonl", '{"text": "a"}\n{"text": "b\n'))), "cannot be read"),
    Cmd("data build", "input records without the text field",
        lambda w: build(w, input=str(write(w.tmp / "f.jsonl", '{"body": "a b"}\n'))), "no field 'text'"),
    Cmd("data build", "input of an unknown format", lambda w: build(w, input=str(write(w.tmp / "a.docx", "x"))),
        "unsupported"),
    Cmd("data build", "sequence length too short", lambda w: build(w, "--seq-len", "4"), "--seq-len 4 is too short"),
    Cmd("data build", "negative sequence length", lambda w: build(w, "--seq-len", "-32"), "--seq-len -32 is too short"),
    Cmd("data build", "zero samples per shard", lambda w: build(w, "--samples-per-shard", "0"), "must be >= 1"),
    Cmd("data build", "zero workers", lambda w: build(w, "--workers", "0"), "must be >= 1"),
    Cmd("data build", "a line larger than --max-doc-mb",
        lambda w: build(w, "--max-doc-mb", "1", input=str(write(w.tmp / "long.jsonl", '{"text": "' + "a" * (1 << 20)
                                                                 + '"}\n'))), "line 1 of"),
    Cmd("data build", "a .txt document larger than --max-doc-mb",
        lambda w: build(w, "--max-doc-mb", "1", input=str(write(w.tmp / "long.txt", "a " * (1 << 20)))),
        "is one record of 2 MiB, more than the 1 MiB"),
    Cmd("data build", "validation fraction too large", lambda w: build(w, "--val-fraction", "0.7"),
        "must be in [0, 0.5)"),
    Cmd("data build", "validation fraction NaN", lambda w: build(w, "--val-fraction", "nan"), "must be in [0, 0.5)"),
    Cmd("data build", "tokenizer missing", lambda w: build(w, "--tokenizer", str(w.tmp / "notok")),
        "cannot load tokenizer"),
    Cmd("data build", "output is a file", lambda w: build(w, "--output", str(write(w.tmp / "afile", "x"))),
        "is not a directory"),
    Cmd("data build", "output is a folder of the user's",
        lambda w: build(w, "--output", str(write(w.tmp / "mine" / "notes.txt", "x").parent), "--overwrite"),
        "not made by dist-train"),
    Cmd("data build", "output holds the input",
        lambda w: build(w, "--output", str(w.tmp), "--overwrite"), "overlap"),
    # data inspect
    Cmd("data inspect", "directory missing", lambda w: ["data", "inspect", str(w.tmp / "none")], "does not exist"),
    Cmd("data inspect", "manifest not JSON",
        lambda w: after(write(w.shards / "manifest.json", "{oops"), "data", "inspect", str(w.shards)), "manifest"),
    Cmd("data inspect", "manifest not UTF-8",
        lambda w: after(write(w.shards / "manifest.json", NOT_UTF8), "data", "inspect", str(w.shards)), "manifest"),
    Cmd("data inspect", "manifest without its shard list",
        lambda w: after(manifest(w, lambda m: m.pop("train")), "data", "inspect", str(w.shards)), "manifest"),
    Cmd("data inspect", "manifest listing a shard that is gone",
        lambda w: after(manifest(w, lambda m: m["train"][0].update(file="gone.tar")), "data", "inspect",
                   str(w.shards)), "gone.tar"),
    Cmd("data inspect", "manifest with a negative sample count",
        lambda w: after(manifest(w, lambda m: m["train"][0].update(samples=-3)), "data", "inspect", str(w.shards)),
        "manifest"),
    Cmd("data inspect", "manifest naming a shard outside its directory",
        lambda w: after(manifest(w, lambda m: m["train"][0].update(file="../../etc/passwd")), "data", "inspect",
                   str(w.shards)), "manifest"),
    Cmd("data inspect", "a shard cut short", damaged_shard, "unreadable after"),
    Cmd("data inspect", "zero samples asked", lambda w: ["data", "inspect", str(w.shards), "--samples", "0"],
        "must be >= 1"),
    # data plan
    Cmd("data plan", "negative start step", lambda w: plan(w, "--from-step", "-1"), "--from-step -1 must be >= 0"),
    Cmd("data plan", "zero steps", lambda w: plan(w, "--steps", "0"), "--steps 0 must be >= 1"),
    Cmd("data plan", "a step no run reaches", lambda w: plan(w, "--from-step", "100000000000000"), "no run gets there"),
    Cmd("data plan", "an epoch no run reaches", lambda w: plan(w, "--epoch", "10000000000"), "no run gets there"),
    Cmd("data plan", "lanes not a multiple of the workers", lambda w: plan(w, "--lanes", "3"),
        "must be a multiple of --world-size"),
    Cmd("data plan", "a mix without its weight", lambda w: plan(w, "--mix", str(w.shards)), "--mix takes DIR:WEIGHT"),
    Cmd("data plan", "a mix weight that is not a number", lambda w: plan(w, "--mix", f"{w.shards}:lots"),
        "the weight must be a number between 0 and 1"),
    Cmd("data plan", "zero workers", lambda w: plan(w, "--world-size", "0"), "--world-size 0 must be >= 1"),
    # validate and print-config
    Cmd("validate", "config file missing", lambda w: ["validate", str(w.tmp / "none.yaml")], "not found"),
    Cmd("validate", "config is a directory", lambda w: ["validate", str(w.tmp)], "not found"),
    Cmd("validate", "config not YAML", lambda w: ["validate", str(write(w.tmp / "b.yaml", "a: [1, 2\n"))],
        "not valid YAML"),
    Cmd("validate", "config not UTF-8", lambda w: ["validate", str(write(w.tmp / "b.yaml", NOT_UTF8))],
        "not valid YAML"),
    Cmd("validate", "config is a list", lambda w: ["validate", str(write(w.tmp / "b.yaml", "- a\n- b\n"))],
        "must be a mapping"),
    Cmd("validate", "config of 2 MB", lambda w: ["validate", str(write(w.tmp / "b.yaml", "#" * (2 << 20)))],
        "is not a config"),
    Cmd("validate", "an override without a key", lambda w: ["validate", str(w.config), "=3"], "not of the form"),
    Cmd("validate", "an override of an unknown key", lambda w: ["validate", str(w.config), "pretrain.speed=3"],
        "unknown config key"),
    Cmd("validate", "an infinite number", lambda w: ["validate", str(w.config), "pretrain.optim.lr=.inf"],
        "must be a finite number"),
    Cmd("print-config", "config file missing", lambda w: ["print-config", str(w.tmp / "none.yaml")], "not found"),
    Cmd("print-config", "aliases that expand a billion times",
        lambda w: ["print-config", str(write(w.tmp / "l.yaml", LAUGHS))], "expands to more than"),
    # export
    Cmd("export", "checkpoint missing", lambda w: ["export", str(w.tmp / "none"), "--output", str(w.tmp / "e")],
        "not a committed checkpoint"),
    Cmd("export", "meta.json not JSON",
        lambda w: after(write(w.ckpt / "meta.json", "{"), "export", str(w.ckpt), "--output", str(w.tmp / "e")),
        "unreadable"),
    Cmd("export", "meta.json not UTF-8",
        lambda w: after(write(w.ckpt / "meta.json", NOT_UTF8), "export", str(w.ckpt), "--output", str(w.tmp / "e")),
        "unreadable"),
    Cmd("export", "meta.json edited after the commit",
        lambda w: after((write(w.ckpt / "meta.json.sha256", "0" * 64), meta(w, lambda m: m.update(format=2))),
                        "export", str(w.ckpt), "--output", str(w.tmp / "e")), "does not match its recorded sha256"),
    Cmd("export", "a file of the checkpoint is gone",
        lambda w: after(meta(w, lambda m: m["files"].update({"model.pt": {"size": 1, "sha256": "0"}})), "export",
                   str(w.ckpt), "--output", str(w.tmp / "e")), "model.pt is missing"),
    Cmd("export", "meta.json listing a file outside the checkpoint",
        lambda w: after(meta(w, lambda m: m["files"].update({"../../x": {"size": 1, "sha256": "0"}})), "export",
                   str(w.ckpt), "--output", str(w.tmp / "e")), "not a file of the checkpoint"),
    Cmd("export", "a checkpoints directory with nothing committed",
        lambda w: after(write(w.tmp / "empty" / "checkpoints" / "latest", "step_9\n"), "export",
                   str(w.tmp / "empty"), "--output", str(w.tmp / "e")), "holds no committed checkpoint"),
    Cmd("export", "output is a folder of the user's",
        lambda w: ["export", str(w.ckpt), "--output", str(write(w.tmp / "mine" / "a.txt", "x").parent)],
        "not made by dist-train"),
    Cmd("export", "output is the stage's own folder",
        lambda w: ["export", str(w.ckpt), "--output", str(w.run / "pretrain")], "overlap"),
    # predict
    Cmd("predict", "negative batch size",
        lambda w: ["predict", str(w.export), "--input", str(w.records), "--batch-size", "-1"], "must be >= 1"),
    Cmd("predict", "output is the input",
        lambda w: ["predict", str(w.export), "--input", str(w.records), "--output", str(w.records)],
        "is the input file"),
    Cmd("predict", "output is a file that exists",
        lambda w: ["predict", str(w.export), "--input", str(w.records), "--output",
                   str(write(w.tmp / "mine.jsonl", "keep\n"))], "pass --overwrite"),
    Cmd("config-reference", "output is a file of the user's",
        lambda w: ["config-reference", "--output", str(write(w.tmp / "notes.md", "# notes\n"))],
        "is not a configuration reference"),
    Cmd("predict", "export missing", lambda w: ["predict", str(w.tmp / "none"), "--input", str(w.records)],
        "is not a directory"),
    Cmd("predict", "export without a task file",
        lambda w: after((w.export / "task.json").unlink(), "predict", str(w.export), "--input", str(w.records)),
        "task.json"),
    Cmd("predict", "task file not JSON",
        lambda w: after(write(w.export / "task.json", "{"), "predict", str(w.export), "--input", str(w.records)),
        "task.json"),
    # ledger verify
    Cmd("ledger verify", "not a run", lambda w: ["ledger", "verify", str(w.tmp / "none")], "holds no committed"),
    Cmd("ledger verify", "meta.json not JSON",
        lambda w: after(write(w.ckpt / "meta.json", "{"), "ledger", "verify", str(w.run)), "is damaged"),
    Cmd("ledger verify", "a shell command planted in meta.json",
        lambda w: after(meta(w, lambda m: m["plan"].update(shards=f"pipe:touch {w.tmp}/ran_{{file}}")),
                        "ledger", "verify", str(w.run)), "never runs a command"),
    Cmd("ledger verify", "a checkpoint without a data plan",
        lambda w: after(meta(w, lambda m: m.pop("plan")), "ledger", "verify", str(w.run)), "no readable data plan"),
    Cmd("ledger verify", "a data plan whose shards are gone",
        lambda w: after(shutil.rmtree(w.shards), "ledger", "verify", str(w.run)), "does not exist"),
    # report and runs
    Cmd("report", "directory missing", lambda w: ["report", str(w.tmp / "none")], "not a directory"),
    Cmd("report", "not a run", lambda w: ["report", str(w.shards)], "holds no dist-train run"),
    Cmd("report", "a report.md of the user's",
        lambda w: after(write(w.run / "report.md", "# notes\n"), "report", str(w.run)), "was not written by"),
    Cmd("report", "a report/ folder of the user's",
        lambda w: after(write(w.run / "report" / "a.txt", "x"), "report", str(w.run)), "not made by dist-train"),
    Cmd("runs", "root missing", lambda w: ["runs", str(w.tmp / "none")], "not a directory"),
    Cmd("runs", "root is a file", lambda w: ["runs", str(write(w.tmp / "f", "x"))], "not a directory"),
    # config-reference
    Cmd("config-reference", "output in a missing directory",
        lambda w: ["config-reference", "--output", str(w.tmp / "no" / "c.md")], "does not exist"),
    Cmd("config-reference", "output is a directory", lambda w: ["config-reference", "--output", str(w.tmp)],
        "is a directory"),
]

LAUGHS = "\n".join(['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
                    *(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10))]) + "\n"


def after(_effect: object, *argv: str) -> list[str]:
    """The argv, once `_effect` (the damage: an argument, so done first) has been done."""
    return list(argv)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CLI_CASES, ids=[f"{c.command}: {c.mistake}" for c in CLI_CASES])
def test_every_command_answers_a_mistake_in_one_line(world, capsys, case):
    argv = [str(a) for a in case.argv(world)]
    before = snapshot(world.tmp)
    assert main(argv) == 2, capsys.readouterr()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert case.message in err, err
    assert snapshot(world.tmp) == before, "a refused command changes nothing (nor runs a planted command)"
