"""Console lines, progress, experiment trackers (real MLflow and W&B, offline), `runs` states, the
report page and its plots, the generated configuration reference, and the Python API."""

import io
import json
import os
import time
from pathlib import Path

import pytest

from dist_train.config.loader import ConfigError
from dist_train.config.schema import LoggingConfig
from tests.conftest import REPO, read_mlflow, read_wandb_offline, run_cli


def metrics_row(step: int, attempt: float, t: float, **extra) -> dict:
    """A row as MetricsLog writes it."""
    return {"step": step, "loss": 8.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens": 2048 * step,
            "tokens_per_s": 10_000.0, "mfu": 0.2, "mem_mb": 800.0, "data_wait_frac": 0.01, "skipped_steps": 0,
            "replaced_samples": 0, **extra, "time": t, "attempt": attempt}


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def commit_checkpoint(stage_dir: Path, step: int, evaluation: dict | None = None) -> None:
    """The files of a committed checkpoint that `runs` and `report` read (meta.json, latest)."""
    tag = f"step_{step:08d}"
    (stage_dir / "checkpoints" / tag).mkdir(parents=True)
    meta = {"step": step, "tag": tag, "world_size": 2, "time": time.time(), "eval": evaluation or {},
            "files": {"model.pt": {"size": 1 << 20, "sha256": "0" * 64}}}
    (stage_dir / "checkpoints" / tag / "meta.json").write_text(json.dumps(meta))
    (stage_dir / "checkpoints" / "latest").write_text(tag)


# --- console -------------------------------------------------------------------------------------------------


def test_console_line_is_compact_and_eta_counts_this_attempt_only(tmp_path):
    from dist_train.train.metrics import MetricsLog, console_line, format_duration

    row = metrics_row(60, 1.0, 0.0, eval_loss=6.47, eval_perplexity=647.0, eval_tokens=12192.0)
    line = console_line("pretrain", row, 120, 13.2)
    assert line == ("[pretrain] 60/120 loss 0.1333 lr 1.00e-03 10,000 tok/s mfu 20.0% eta 13s "
                    "| eval loss 6.47 perplexity 647")
    assert [format_duration(s) for s in (5, 425, 11225)] == ["5s", "7:05", "3:07:05"]
    # resumed at step 100 of 200: 10 steps in this attempt took 100 s, so the 90 left take 900 s (not the
    # 1,000 s that counting all 110 steps would give); a few seconds of slack for a slow machine
    out = io.StringIO()
    log = MetricsLog(tmp_path / "metrics.jsonl", "pretrain", 200, out, start_step=100)
    log.start -= 100.0
    log.log(metrics_row(110, 1.0, 0.0))
    log.close()
    eta = out.getvalue().split(" eta ")[1].strip()
    assert eta in [f"15:{s:02d}" for s in range(6)], out.getvalue()


def test_progress_prints_throttled_lines_without_a_terminal_and_nothing_when_disabled():
    from dist_train.progress import Progress

    out = io.StringIO()
    with Progress("[pretrain] eval", total=4, unit="batches", every_s=0.0, stream=out) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines[:4] == [f"[pretrain] eval: {i}/4 batches ({i * 25}%) (0 s)" for i in range(1, 5)]
    assert lines[4].startswith("[pretrain] eval: 4/4 batches (100%) in ") and "\r" not in out.getvalue()
    quiet = io.StringIO()
    with Progress("x", every_s=3600, stream=quiet) as bar:
        bar.update(5)  # within the interval: only the closing line
    assert quiet.getvalue().startswith("x: 5 in ") and quiet.getvalue().count("\n") == 1
    silent = io.StringIO()
    with Progress("x", enabled=False, stream=silent) as bar:
        bar.update()
    assert silent.getvalue() == ""


# --- trackers --------------------------------------------------------------------------------------------------


def test_trackers_need_their_credentials_from_the_environment():
    from dist_train.launch.trackers import check_trackers

    check_trackers(LoggingConfig(), env={})  # none chosen: nothing needed
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set: export MLFLOW_TRACKING_URI="):
        check_trackers(LoggingConfig(trackers=("mlflow",)), env={})
    with pytest.raises(ConfigError, match="no W&B key is set: export WANDB_API_KEY"):
        check_trackers(LoggingConfig(trackers=("wandb",)), env={"HOME": "/nonexistent"})
    check_trackers(LoggingConfig(trackers=("wandb",)), env={"WANDB_MODE": "offline"})
    res = run_cli("validate", str(REPO / "configs" / "quickstart.yaml"), "logging.wandb_api_key=abc")
    assert res.returncode == 2 and "unknown config key 'logging.wandb_api_key'" in res.stderr


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> Path:
    """A real MLflow file store and W&B in offline mode, both under tmp_path: nothing leaves the machine."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return store


def test_trackers_get_every_row_once_across_a_resume(tmp_path, tracker_env):
    """The driver forwards metrics.jsonl while a stage runs; a rerun on the same output_dir continues the
    same tracker runs and sends only the rows written since."""
    from dist_train.launch.trackers import Trackers
    from dist_train.outputs import TRACKERS

    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    metrics = out / "pretrain" / "metrics.jsonl"
    cfg = LoggingConfig(trackers=("mlflow", "wandb"), project="unit", tags={"team": "nlp"})
    config = {"output_dir": str(out), "pretrain": {"train": {"max_steps": 40}}}
    t0 = time.time()
    out.mkdir()
    first = Trackers(cfg, out, config, log=lambda m: None)
    with first.follow("pretrain", every_s=0.05):
        write_rows(metrics, [metrics_row(s, 1.0, t0 + s) for s in (10, 20)])
        time.sleep(0.3)
        with open(metrics, "a") as f:
            f.write(json.dumps(metrics_row(30, 1.0, t0 + 30))[:25])  # a line being written: not sent yet
    first.finish("preempted")
    ids = json.loads((out / TRACKERS).read_text())
    assert read_mlflow(tracker_env, ids["mlflow"], "pretrain/loss") == [(10, 0.8), (20, 0.4)]

    with open(metrics, "a") as f:  # the cut line completes; a line a crash cut short; the resumed attempt logs on
        f.write(json.dumps(metrics_row(30, 1.0, t0 + 30))[25:] + "\n")
        f.write(json.dumps(metrics_row(35, 1.0, t0 + 35))[:40] + "\n")
    write_rows(metrics, [metrics_row(40, 2.0, t0 + 60)])
    second = Trackers(cfg, out, config, log=lambda m: None)
    with second.follow("pretrain", every_s=60):
        pass
    second.summary({"stages": {"pretrain": {"final_train_loss": 0.2, "eval": {"loss": 0.3}}}}, metrics)
    second.finish("completed")
    assert json.loads((out / TRACKERS).read_text())["mlflow"] == ids["mlflow"], "the same MLflow run continues"
    assert [s for s, _ in read_mlflow(tracker_env, ids["mlflow"], "pretrain/loss")] == [10, 20, 30, 40]
    assert read_mlflow(tracker_env, ids["mlflow"], "pretrain/final/eval_loss") == [(0, 0.3)]
    history, summary = read_wandb_offline(out)
    assert [h["pretrain/step"] for h in history] == [10, 20, 30, 40]
    assert history[0]["pretrain/loss"] == 0.8 and summary["pretrain/final/final_train_loss"] == 0.2


# --- runs and report -----------------------------------------------------------------------------------------


def make_run(root: Path, name: str, state: str | None, updated_ago: float, checkpoint: int | None = None,
             pid: int = 999_999_999, done: bool = False, host: str | None = None) -> Path:
    import socket

    out = root / name
    t = time.time() - updated_ago
    write_rows(out / "pretrain" / "metrics.jsonl", [metrics_row(s, 1.0, t - 20 + s) for s in (10, 20)])
    if checkpoint:
        commit_checkpoint(out / "pretrain", checkpoint, {"loss": 5.5, "perplexity": 244.7})
    (out / "pretrain" / "attempts.json").write_text(json.dumps([{"start": t - 30, "end": t}]))
    if state is not None:
        status = {"state": state, "stage": "pretrain", "stages": ["pretrain"], "max_steps": {"pretrain": 40},
                  "pid": pid, "host": host or socket.gethostname(), "started": t - 40, "updated": t}
        if state == "failed":
            status["error"] = "stage pretrain failed: CUDA out of memory"
        (out / "run.json").write_text(json.dumps(status))
    if done:
        (out / "report.json").write_text(json.dumps({"config": {}, "stages": {"pretrain": {"steps": 40}}}))
    return out


def test_runs_tells_running_completed_resumable_and_failed_apart(tmp_path):
    from dist_train.report.runs import list_runs, render

    root = tmp_path / "runs"
    make_run(root, "a-live", "running", 5, pid=os.getpid())
    make_run(root, "b-done", "completed", 3600, checkpoint=20, done=True)
    make_run(root, "c-preempted", "preempted", 600, checkpoint=20)
    make_run(root, "d-killed", "running", 4000, checkpoint=20)  # driver SIGKILLed: status never updated
    make_run(root, "e-oom", "failed", 60, checkpoint=20)
    make_run(root, "f-early", "running", 4000)  # killed before its first checkpoint
    make_run(root / "team", "g-nested", "completed", 90000, done=True)
    make_run(root, "h-on-node7", "running", 20, checkpoint=20, host="node7")  # seen from a login node: by age
    make_run(root, "i-on-node7", "running", 900, checkpoint=20, host="node7")
    (root / "not-a-run").mkdir()
    rows = {r.path: r for r in list_runs(root)}
    assert {k: v.state for k, v in rows.items()} == {
        "a-live": "running", "b-done": "completed", "c-preempted": "resumable", "d-killed": "resumable",
        "e-oom": "failed", "f-early": "failed", "team/g-nested": "completed", "h-on-node7": "running",
        "i-on-node7": "resumable"}
    assert rows["a-live"].step == "20/40" and rows["a-live"].stage == "pretrain"
    assert rows["b-done"].best == "loss 5.5 @20" and rows["b-done"].age == "1h"
    assert rows["c-preempted"].note == "preempted; rerun resumes at pretrain step 20"
    assert rows["d-killed"].note.startswith("stopped without a final status")
    assert rows["e-oom"].note == "stage pretrain failed: CUDA out of memory (rerun resumes at pretrain step 20)"
    assert rows["team/g-nested"].age == "1d"
    table = render(list(rows.values()))
    assert table.splitlines()[0].split() == ["PATH", "STATE", "STAGE", "STEP", "BEST", "AGE", "NOTE"]
    res = run_cli("runs", str(root), "--json")
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 9
    typed = {r["path"]: r for r in map(json.loads, res.stdout.splitlines())}
    done = typed["b-done"]
    assert (done["step"], done["max_steps"], done["best_metric"], done["best_value"], done["best_step"]) == \
        (20, 40, "loss", 5.5, 20) and isinstance(done["updated"], float) and done["state"] == "completed"
    assert typed["f-early"]["best_value"] is None
    res = run_cli("runs", str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def test_report_marks_restarts_and_lists_checkpoints(tmp_path):
    """A run whose worker group restarted once: the page counts the restart, the plots exist as PNGs,
    and the checkpoints kept are listed with `latest` and `best`."""
    from dist_train.report.data import load_run
    from dist_train.report.page import write_report

    out = make_run(tmp_path, "run", "completed", 5, checkpoint=20, done=True)
    t = time.time()
    write_rows(out / "pretrain" / "metrics.jsonl",  # the restart re-does steps 21-30 after resuming at 20
               [metrics_row(30, 2.0, t + 30, eval_loss=4.0, eval_perplexity=54.6), metrics_row(40, 2.0, t + 40)])
    (out / "pretrain" / "attempts.json").write_text(json.dumps([{"start": t - 40, "end": t}, {"start": t + 5,
                                                                                             "end": t + 41}]))
    commit_checkpoint(out / "pretrain", 40, {"loss": 4.0})
    (out / "pretrain" / "checkpoints" / "best").write_text("step_00000040")
    assert load_run(out).stages["pretrain"].resume_points() == [(30, t + 30)]
    # the settings, and a classification fine-tune's test set class by class
    config = {"seed": 3, "ray": {"num_workers": 2},
              "pretrain": {"train": {"max_steps": 40, "global_batch_size": 16}, "optim": {"lr": 3e-4}},
              "finetune": {"task": "sequence_classification", "train": {"max_steps": 20}, "optim": {"lr": 1e-3}}}
    test = {"accuracy": 0.75, "per_class": {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2.0},
                                            "b": {"precision": 0.667, "recall": 1.0, "f1": 0.8, "support": 2.0}},
            "confusion": {"labels": ["a", "b"], "gold_labels": ["a", "b"], "counts": [[1.0, 1.0], [0.0, 2.0]]}}
    (out / "finetune").mkdir()
    (out / "finetune" / "result.json").write_text(json.dumps({"steps": 20, "test": test, "export_dir": "/x/export",
                                                              "int8_export_dir": "/x/export-int8"}))
    (out / "report.json").write_text(json.dumps({"config": config, "stages": {"pretrain": {"steps": 40}}}))
    write_rows(out / "pretrain" / "metrics.jsonl", [metrics_row(41, 2.0, t + 41, step_losses=[0.5])])
    files = write_report(out, ("md", "html"))
    names = sorted(p.name for p in files)
    assert names == ["learning_rate.png", "loss.png", "memory.png", "optimization.png", "report.html", "report.md",
                     "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files if p.suffix == ".png")
    page = (out / "report.md").read_text()
    assert "1 restart(s); each is a red dashed line on the plots." in page
    assert "| step_00000040 | 40 |" in page and "| latest, best |" in page and "![Loss and evaluation]" in page
    for needle in ("| setting | pretrain | finetune |", "| learning rate | 0.0003 | 0.001 |", "| workers | 2 | 2 |",
                   "| class | precision | recall | F1 | support |", "| a | 1 | 0.5 | 0.667 | 2 |",
                   "| true ↓ predicted → | a | b |", "| b | 0 | 2 |", "`/x/export-int8` | - | int8 copy",
                   "![Gradient norm and data wait]"):
        assert needle in page, needle
    html = (out / "report.html").read_text()  # one file: the images are inside it
    assert "<table>" in html and html.count('<img src="data:image/png;base64,') == 5 and 'src="report/' not in html
    assert not list(tmp_path.glob("run/.report.*"))
    res = run_cli("report", str(tmp_path / "empty-dir-that-is-missing"))
    assert res.returncode == 2 and "not a directory" in res.stderr


# --- docs and API --------------------------------------------------------------------------------------------


def test_configuration_reference_is_generated_and_current():
    from dist_train.config.loader import all_keys
    from dist_train.config.reference import reference

    page = reference()
    assert (REPO / "docs" / "configuration.md").read_text() == page, (
        "docs/configuration.md is stale: run `dist-train config-reference --output docs/configuration.md`")
    for key in all_keys():
        # a key inside a list section is written with [] after the list's name: pretrain.data.mix[].weight
        variants = [key] + [key[:i] + "[]" + key[i:] for i, c in enumerate(key) if c == "."]
        assert any(f"| `{v}` |" in page for v in variants), key
    assert "| `finetune.optim.lr` | float | `5e-05` |" in page  # the section's own default, not pretrain's
    assert "| `ray.num_workers` | int | `2` | ≥ 1 |" in page


def test_python_api_loads_configs_like_the_cli():
    import dist_train
    from dist_train import load_config

    assert callable(dist_train.run)
    a = load_config(REPO / "configs" / "quickstart.yaml", ["pretrain.train.max_steps=7"])
    b = load_config(str(REPO / "configs" / "quickstart.yaml"), {"pretrain.train.max_steps": 7})
    assert a == b and a.pretrain.train.max_steps == 7
    c = load_config({"pretrain": {"data": {"shards": "s"}}, "model": {"name_or_path": "m"}},
                    {"logging.trackers": ["mlflow"], "seed": 3})
    assert c.logging.trackers == ("mlflow",) and c.seed == 3 and c.pretrain.data.shards == "s"
    with pytest.raises(ConfigError, match="unknown config key 'pretrian'"):
        load_config({"pretrian": {}})


def test_runs_lists_every_run_when_one_is_damaged(tmp_path):
    """A run whose files are not UTF-8, not JSON or of the wrong shape is listed, and the others with it."""
    make_run(tmp_path, "good", "completed", 5, checkpoint=20, done=True)
    bad = make_run(tmp_path, "bad", "running", 5, checkpoint=20)
    (bad / "run.json").write_bytes(b"\xff\xfe{{")
    (bad / "report.json").write_text("[1, 2]")
    (bad / "pretrain" / "attempts.json").write_text('[{"start": "x"}, 3]')
    (bad / "pretrain" / "checkpoints" / "step_00000020" / "meta.json").write_text("{")
    res = run_cli("runs", str(tmp_path))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()[1:]]
    assert sorted(names) == ["bad", "good"]
    assert run_cli("report", str(bad)).returncode == 0, "its page is still written, from what can be read"


def test_a_damaged_result_leaves_its_section_out_not_the_page(tmp_path):
    from dist_train.report.page import write_report

    out = make_run(tmp_path, "run", "completed", 5, checkpoint=20, done=True)
    (out / "finetune").mkdir()
    (out / "finetune" / "result.json").write_text(json.dumps({"steps": 2, "test": {
        "accuracy": float("nan"), "per_class": {"a": {"precision": None, "support": float("nan")}},
        "confusion": {"labels": ["a"], "gold_labels": ["a"], "counts": [1, 2]}}}))
    (out / "report.json").write_text(json.dumps({"config": {"pretrain": "not a mapping", "ray": 3}, "stages": {}}))
    write_report(out)
    page = (out / "report.md").read_text()
    assert "| a | - | - | - | - |" in page and "## Settings" not in page
    res = run_cli("report", str(out), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["stages"]["finetune"]["test"]["accuracy"] is None
