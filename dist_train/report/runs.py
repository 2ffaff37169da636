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
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_train.config.schema import STAGES, headline
from dist_train.outputs import REPORT, STATUS
from dist_train.report.data import NotARun, RunData, StageData, age, load_run

STALE_S = 180.0  # well above run.json's 30 s tick and a log interval of a healthy run
MAX_DEPTH = 4


@dataclass
class RunRow:
    path: str
    state: str
    stage: str
    step: str
    best: str
    age: str
    note: str


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


def best_of(stage: StageData, metric: str | None) -> str:
    """The best checkpoint's value of the stage's best metric (or the last evaluation)."""
    best = next((c for c in stage.checkpoints if c.tag == stage.best), None) or next(
        (c for c in reversed(stage.checkpoints) if c.eval), None)  # no `best` yet: the newest evaluated one
    evaluation = best.eval if best else (stage.result or {}).get("eval") or {}
    if not evaluation:
        evals = stage.evals
        evaluation = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    metric = metric if metric in evaluation else next(iter(headline(evaluation)), next(iter(evaluation), None))
    if metric is None:
        return "-"
    at = f" @{best.step}" if best else ""
    return f"{metric} {evaluation[metric]:.4g}{at}"


def describe(path: Path, root: Path, now: float | None = None) -> RunRow:
    run = load_run(path)
    state, note = state_of(run, now)
    status = run.status or {}
    stage_name = status.get("stage") or (list(run.stages)[-1] if run.stages else "-")
    stage = run.stages.get(stage_name)
    step, best = "-", "-"
    if stage is not None:
        total = run.max_steps(stage_name)
        step = f"{stage.last_step}/{total}" if total else str(stage.last_step)
        metric = (stage.result or {}).get("best_metric")
        best = best_of(stage, metric)
    rel = str(path.relative_to(root)) if path != root else path.name
    return RunRow(path=rel or ".", state=state, stage=stage_name, step=step, best=best,
                  age=age(run.updated), note=note)


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
    table = [[c.upper() for c in cols]] + [[str(asdict(r)[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in table).rstrip()
