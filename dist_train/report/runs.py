"""`dist-train runs ROOT`: every run under a directory, with its state, stage, step, best metric and age.

States:
- running: the driver's run.json says so and it is alive: on the driver's host, its pid exists;
  from another host (a login node), its status tick, a metrics row or a heartbeat is younger
  than STALE_S;
- completed: every stage it was asked to run finished;
- resumable: it stopped without finishing (preempted, or killed: run.json says running but nothing
  moves) and a stage it did not finish has a committed checkpoint: rerunning the same command resumes;
- failed: the driver recorded an error, or it stopped before its first checkpoint. A failed run
  with a checkpoint says so in the note: rerunning resumes it once the cause is fixed.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.config.schema import STAGES, headline
from dist_train.outputs import REPORT, STATUS
from dist_train.report.data import NotARun, RunData, StageData, age, load_run

STALE_S = 180.0  # well above run.json's 30 s tick and a log interval of a healthy run
MAX_DEPTH = 4


@dataclass
class RunRow:
    """One run as `dist-train runs` shows it (display strings), with the numbers behind them."""

    path: str
    state: str
    stage: str
    step: str
    best: str
    age: str
    note: str
    step_n: int | None = None
    max_steps: int | None = None
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    updated: float | None = None  # unix time of the run's last sign of life

    def typed(self) -> dict[str, Any]:
        """The row for scripts (`runs --json`): numbers as numbers, None where unknown."""
        return {"path": self.path, "state": self.state, "stage": None if self.stage == "-" else self.stage,
                "step": self.step_n, "max_steps": self.max_steps, "best_metric": self.best_metric,
                "best_value": self.best_value, "best_step": self.best_step, "updated": self.updated,
                "note": self.note}


def find_runs(root: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """Directories under root (root included) that are run output_dirs. Does not descend into a run."""
    found: list[Path] = []
    if (root / STATUS).is_file() or ((root / REPORT).is_file()
                                         and any((root / stage).is_dir() for stage in STAGES)):
        return [root]
    if depth == 0:
        return found
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    except OSError:
        return found
    for child in children:
        found += find_runs(child, depth - 1)
    return found


def _alive(status: dict) -> bool:
    try:
        os.kill(int(status["pid"]), 0)
        return True
    except (OSError, KeyError, ValueError):
        return False


def state_of(run: RunData, now: float | None = None) -> tuple[str, str]:
    """(state, note) of a run; see the module docstring."""
    now = time.time() if now is None else now
    status = run.status or {}
    wanted = status.get("stages") or list(run.stages)
    done = set((run.report or {}).get("stages", {}))
    unfinished = [s for s in wanted if s not in done]
    resumable_at = next((f"{s} step {run.stages[s].checkpoints[-1].step}" for s in unfinished
                         if s in run.stages and run.stages[s].checkpoints), None)
    state = status.get("state")
    # On the driver's host its pid decides; elsewhere (a login node) only the age of its last sign of life.
    here = status.get("host") == socket.gethostname()
    if state == "running" and (_alive(status) if here else now - run.updated < STALE_S):
        return "running", f"pid {status.get('pid')} on {status.get('host')}"
    if state == "completed" or (state is None and run.report and not unfinished):
        return "completed", ""
    if state == "failed":
        error = status.get("error", "")
        return "failed", error + (f" (rerun resumes at {resumable_at})" if resumable_at else "")
    if resumable_at:
        why = "preempted" if state == "preempted" else "stopped without a final status (killed?)"
        return "resumable", f"{why}; rerun resumes at {resumable_at}"
    return "failed", "stopped before its first checkpoint" if state != "preempted" else "preempted before a checkpoint"


def best_of(stage: StageData, metric: str | None) -> tuple[str, float, int | None] | None:
    """(metric, value, step) of the best checkpoint by the stage's best metric (or of the last evaluation)."""
    best = next((c for c in stage.checkpoints if c.tag == stage.best), None) or next(
        (c for c in reversed(stage.checkpoints) if c.eval), None)  # no `best` yet: the newest evaluated one
    evaluation = best.eval if best else (stage.result or {}).get("eval") or {}
    if not evaluation:
        evals = stage.evals
        evaluation = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    metric = metric if metric in evaluation else next(iter(headline(evaluation)), next(iter(evaluation), None))
    if metric is None or not isinstance(evaluation[metric], int | float):
        return None
    return metric, float(evaluation[metric]), best.step if best else None


STAGE_NUMBERS = ("steps", "tokens", "tokens_per_s", "mfu", "goodput", "final_train_loss", "eval", "test",
                 "test_int8", "best_metric", "exported_checkpoint", "export_dir", "resumed_from", "stopped_early",
                 "attempts_ended", "adaptation", "compare_base")


def run_summary(run: RunData) -> dict[str, Any]:
    """A run's state and each stage's figures for scripts (`report --json`): numbers as numbers."""
    state, note = state_of(run)
    stages = {}
    for name, s in run.stages.items():
        result = s.result if isinstance(s.result, dict) else {}
        stages[name] = {**{k: result[k] for k in STAGE_NUMBERS if k in result},
                        "last_step": s.last_step, "attempts": len(s.attempts),
                        "checkpoints": [c.tag for c in s.checkpoints], "latest": s.latest, "best": s.best,
                        "incidents": len(s.incidents)}
    return {"path": str(run.out), "state": state, "note": note, "updated": run.updated or None, "stages": stages}


def describe(path: Path, root: Path, now: float | None = None) -> RunRow:
    run = load_run(path)
    state, note = state_of(run, now)
    status = run.status or {}
    stage_name = status.get("stage") or (list(run.stages)[-1] if run.stages else "-")
    stage = run.stages.get(stage_name)
    step, best, total, found = "-", "-", None, None
    if stage is not None:
        total = run.max_steps(stage_name)
        step = f"{stage.last_step}/{total}" if total else str(stage.last_step)
        found = best_of(stage, (stage.result or {}).get("best_metric"))
        if found is not None:
            best = f"{found[0]} {found[1]:.4g}" + (f" @{found[2]}" if found[2] is not None else "")
    rel = str(path.relative_to(root)) if path != root else path.name
    return RunRow(path=rel or ".", state=state, stage=stage_name, step=step, best=best, age=age(run.updated),
                  note=note, step_n=stage.last_step if stage is not None else None,
                  max_steps=total or None, best_metric=found[0] if found else None,
                  best_value=found[1] if found else None, best_step=found[2] if found else None,
                  updated=run.updated or None)


def list_runs(root: str | Path, now: float | None = None) -> list[RunRow]:
    root = Path(root)
    if not root.is_dir():
        raise NotARun(f"{root} is not a directory: pass the directory that holds your runs' output_dirs")
    rows = []
    for path in find_runs(root):
        try:
            rows.append(describe(path, root, now))
        except NotARun:
            continue
        except Exception as e:  # a damaged run is listed as such; the others are still shown
            rel = str(path.relative_to(root)) if path != root else path.name
            rows.append(RunRow(path=rel or ".", state="damaged", stage="-", step="-", best="-", age="-",
                               note=f"unreadable ({e.__class__.__name__}): dist-train report {rel} says more"))
    return rows


def render(rows: list[RunRow]) -> str:
    if not rows:
        return "no runs found"
    cols = ["path", "state", "stage", "step", "best", "age", "note"]
    table = [[c.upper() for c in cols]] + [[str(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in table).rstrip()
