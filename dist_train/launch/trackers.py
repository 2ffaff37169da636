"""Experiment trackers (MLflow, Weights & Biases), fed by the driver from the workers' metrics.jsonl.

Rank 0 writes OUTPUT_DIR/<stage>/metrics.jsonl (and TensorBoard events) itself; the driver tails
that file while a stage runs and forwards each row. So:
- credentials stay in the driver's environment: nothing is copied into Ray's runtime env, and
  workers never import a tracker;
- a tracker that fails mid-run is reported once and dropped: training does not stop for it;
- a rerun on the same output_dir (a resume) continues the same tracker runs, whose ids and the
  rows already sent are kept in OUTPUT_DIR/trackers.json.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import netrc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_train.config.loader import ConfigError
from dist_train.config.schema import LoggingConfig
from dist_train.launch.status import outcome
from dist_train.outputs import METRICS, TRACKERS, parse_jsonl, write_atomic


def check_trackers(cfg: LoggingConfig, env: dict[str, str] | None = None) -> None:
    """Before Ray starts: each chosen tracker is installed and has its credentials in the environment."""
    env = dict(os.environ) if env is None else env
    for name in cfg.trackers:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"logging.trackers includes {name}, which is not installed: "
                              f"pip install 'dist_train[{name}]'")
    if "mlflow" in cfg.trackers and not env.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("logging.trackers includes mlflow but MLFLOW_TRACKING_URI is not set: export "
                          "MLFLOW_TRACKING_URI=http://your-mlflow:5000 (and MLFLOW_TRACKING_TOKEN or "
                          "MLFLOW_TRACKING_USERNAME/PASSWORD if it needs them)")
    if "wandb" in cfg.trackers and not (env.get("WANDB_API_KEY") or env.get("WANDB_MODE") in ("offline", "disabled")
                                        or _wandb_netrc()):
        raise ConfigError("logging.trackers includes wandb but no W&B key is set: export WANDB_API_KEY=... "
                          "(or run `wandb login`, or export WANDB_MODE=offline to sync later)")


def _wandb_netrc() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time", "attempt")}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as tracker parameters."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def final_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline figures, per stage: final train loss, tokens/s, MFU, eval and test metrics."""
    out: dict[str, float] = {}
    for stage, r in report.get("stages", {}).items():
        for key in ("final_train_loss", "tokens_per_s", "mfu", "goodput", "steps", "tokens"):
            if isinstance(r.get(key), (int, float)):
                out[f"{stage}/final/{key}"] = float(r[key])
        for group in ("eval", "test"):
            out.update({f"{stage}/final/{group}_{k}": v for k, v in numeric(r.get(group) or {}).items()})
        adapted = r.get("adaptation") or {}
        for name, e in (adapted.get("sets") or {}).items():
            for when in ("before", "after"):
                out.update({f"{stage}/adaptation/{name}/{when}_{k}": v for k, v in numeric(e.get(when) or {}).items()})
            if isinstance(e.get("forgetting"), float):
                out[f"{stage}/adaptation/{name}/forgetting"] = e["forgetting"]
        for key in ("domain_gain", "forgetting"):
            if isinstance(adapted.get(key), float):
                out[f"{stage}/adaptation/{key}"] = adapted[key]
        compared = r.get("compare_base") or {}
        if compared:
            out.update({f"{stage}/compare_base/{k}": float(compared[k]) for k in ("adapted", "base", "difference")})
            out[f"{stage}/compare_base/ci95_low"], out[f"{stage}/compare_base/ci95_high"] = compared["ci95"]
    return out


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: LoggingConfig, run_name: str, config: dict[str, Any], run_id: str | None) -> None:
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "creating experiment ...": not news
        self.mlflow = mlflow
        mlflow.set_experiment(cfg.project)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=dict(cfg.tags))
        self.run_id = self.run.info.run_id
        self.where = f"run {self.run_id} in experiment {cfg.project!r} at {mlflow.get_tracking_uri()}"
        if run_id is None:
            params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in flatten(config).items()}
            mlflow.log_params({k: v[:6000] for k, v in params.items()})
            mlflow.log_dict(config, "config.json")

    def log(self, stage: str, rows: list[dict[str, Any]]) -> None:
        """In batches (one request per 1000 values, MLflow's limit), stamped with each row's wall time."""
        from mlflow.entities import Metric

        now = time.time()
        metrics = [Metric(f"{stage}/{k}", v, int(1000 * row.get("time", now)), int(row["step"]))
                   for row in rows for k, v in numeric(row).items()]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def summary(self, report: dict[str, Any], report_path: Path) -> None:
        self.mlflow.log_metrics(final_metrics(report), run_id=self.run_id)
        self.mlflow.log_artifact(str(report_path), run_id=self.run_id)

    def finish(self, status: str) -> None:
        self.mlflow.end_run({"completed": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: LoggingConfig, run_name: str, config: dict[str, Any], run_id: str | None,
                 directory: Path) -> None:
        import wandb

        # quiet: W&B's banner and its closing history table took 35 lines of the quickstart's console
        self.run = wandb.init(project=cfg.project, name=run_name, id=run_id, resume="allow", config=config,
                              tags=[f"{k}:{v}" for k, v in cfg.tags.items()], dir=str(directory),
                              settings=wandb.Settings(quiet=True))
        self.run_id = self.run.id
        self.where = self.run.url or f"offline run in {self.run.dir} (upload: wandb sync {Path(self.run.dir).parent})"
        self.defined: set[str] = set()

    def log(self, stage: str, rows: list[dict[str, Any]]) -> None:
        if stage not in self.defined:  # each stage on its own step axis; a restart's re-done steps plot again
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.defined.add(stage)
        for row in rows:
            self.run.log({f"{stage}/step": int(row["step"]), **{f"{stage}/{k}": v for k, v in numeric(row).items()}})

    def summary(self, report: dict[str, Any], report_path: Path) -> None:
        self.run.summary.update(final_metrics(report))

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class Trackers:
    """The chosen trackers of one run. Calls that fail drop that tracker with one warning."""

    def __init__(self, cfg: LoggingConfig, out: Path, config: dict[str, Any], log=print) -> None:
        self.out, self.log_fn = out, log
        self.state: dict[str, Any] = json.loads((out / TRACKERS).read_text()) if (out / TRACKERS).is_file() else {}
        self.state.setdefault("offsets", {})
        self.lock = threading.Lock()
        name = cfg.run_name or out.resolve().name
        self.active: list[Any] = []
        for kind in cfg.trackers:
            try:
                tracker = (MlflowTracker(cfg, name, config, self.state.get(kind)) if kind == "mlflow"
                           else WandbTracker(cfg, name, config, self.state.get(kind), out))
            except Exception as e:  # a wrong URI or key: say so before any training time is spent
                self.finish("failed")
                raise ConfigError(f"logging.trackers: could not start a {kind} run: {one_line(e)}") from e
            self.state[kind] = tracker.run_id
            self.active.append(tracker)
            log(f"{kind}: {tracker.where}")
        self.save()

    def save(self) -> None:
        write_atomic(self.out / TRACKERS, json.dumps(self.state, indent=1))

    def call(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # the run goes on; metrics.jsonl and TensorBoard still have everything
                self.active.remove(tracker)
                self.log_fn(f"warning: {tracker.name} failed ({one_line(e)}); no further {tracker.name} logging "
                            "in this run (metrics.jsonl and TensorBoard are unaffected)")

    def forward(self, stage: str) -> None:
        """Send the rows of <stage>/metrics.jsonl not sent yet (complete lines only)."""
        with self.lock:
            path = self.out / stage / METRICS
            offset = self.state["offsets"].get(stage, 0)
            if not path.is_file() or path.stat().st_size <= offset:
                return
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]
            rows = parse_jsonl(complete.decode())
            if rows:
                self.call("log", stage, rows)
            self.state["offsets"][stage] = offset + len(complete)
            self.save()

    @contextlib.contextmanager
    def follow(self, stage: str, every_s: float = 5.0) -> Iterator[None]:
        """Forward the stage's metrics every `every_s` while the block runs, and the rest after it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                self.forward(stage)

        thread = threading.Thread(target=loop, name=f"trackers-{stage}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.forward(stage)

    def summary(self, report: dict[str, Any], report_path: Path) -> None:
        self.call("summary", report, report_path)

    def finish(self, status: str) -> None:
        self.call("finish", status)


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def tracking(cfg: LoggingConfig, out: Path, config: dict[str, Any], log=print) -> Iterator[Trackers | None]:
    """The run's trackers (None when none are configured), finished with the run's outcome."""
    if not cfg.trackers:
        yield None
        return
    trackers = Trackers(cfg, out, config, log)
    try:
        yield trackers
    except BaseException as e:
        trackers.finish(outcome(e))
        raise
    trackers.finish(outcome(None))
