"""The report's PNG plots (matplotlib, Agg: no display needed). Each function writes one file and
returns its path, or None when the run has nothing to plot for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.report.data import RunData, StageData

RESTART_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1, "alpha": 0.8}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _mark_resumes(ax: Any, stage: StageData) -> None:
    for i, (step, _) in enumerate(stage.resume_points()):
        ax.axvline(step, **RESTART_STYLE, label="restart (resumed here)" if i == 0 else None)


def loss(run: RunData, path: Path) -> Path | None:
    """Train and eval loss per stage over steps, and each stage's other eval metrics; restarts marked."""
    stages = [s for s in run.stages.values() if s.rows]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.4 * len(stages)), squeeze=False)
    for (ax, ax_eval), s in zip(axes, stages, strict=True):
        ax.plot([r["step"] for r in s.rows], [r["loss"] for r in s.rows], label="train loss", color="tab:blue")
        evals = [r for r in s.evals if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                    color="tab:orange")
        _mark_resumes(ax, s)
        ax.set(title=f"{s.name}: loss", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        others = sorted({k for r in s.evals for k, v in r.items() if k.startswith("eval_") and k != "eval_loss"
                         and k[5:] not in ("tokens", "examples") and isinstance(v, (int, float))})
        for key in others:
            points = [r for r in s.evals if key in r]
            ax_eval.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=key[5:])
        if others:
            _mark_resumes(ax_eval, s)
            ax_eval.legend(fontsize=8)
        ax_eval.set(title=f"{s.name}: evaluation", xlabel="step")
        ax_eval.grid(alpha=0.3)
    return _save(fig, path)


def learning_rate(run: RunData, path: Path) -> Path | None:
    stages = [s for s in run.stages.values() if s.rows]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.2), squeeze=False)
    for ax, s in zip(axes[0], stages, strict=True):
        ax.plot([r["step"] for r in s.rows], [r["lr"] for r in s.rows], color="tab:green")
        _mark_resumes(ax, s)
        ax.set(title=f"{s.name}: learning rate", xlabel="step", ylabel="lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _timeline(run: RunData) -> tuple[float, list[StageData]]:
    stages = [s for s in run.stages.values() if any("time" in r for r in s.rows)]
    starts = [a["start"] for s in stages for a in s.attempts]
    starts += [r["time"] for s in stages for r in s.rows if "time" in r]
    starts += [run.status["started"]] if run.status and "started" in run.status else []
    return min(starts, default=0.0), stages


def _mark_attempts(ax: Any, run_start: float, stages: list[StageData]) -> None:
    """Each restart's start on the time axis, and each stage's span shaded."""
    first = True
    for i, s in enumerate(stages):
        if s.attempts:
            ax.axvspan((s.attempts[0]["start"] - run_start) / 60, (s.attempts[-1]["end"] - run_start) / 60,
                       color=f"C{i}", alpha=0.06, label=f"{s.name}")
        for a in s.attempts[1:]:
            ax.axvline((a["start"] - run_start) / 60, **RESTART_STYLE, label="restart" if first else None)
            first = False


def throughput(run: RunData, path: Path) -> Path | None:
    """tokens/s and MFU over wall time (minutes since the run's first attempt), restarts marked."""
    t0, stages = _timeline(run)
    if not stages:
        return None
    plt = _plt()
    fig, (ax, ax_mfu) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for s in stages:
        rows = [r for r in s.rows if "time" in r]
        minutes = [(r["time"] - t0) / 60 for r in rows]
        ax.plot(minutes, [r["tokens_per_s"] for r in rows], ".-", label=f"{s.name} tokens/s")
        ax_mfu.plot(minutes, [100 * r["mfu"] for r in rows], ".-", label=f"{s.name} MFU")
    for a in (ax, ax_mfu):
        _mark_attempts(a, t0, stages)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set(title="throughput", ylabel="tokens/s")
    ax_mfu.set(ylabel="MFU (%)", xlabel="minutes since the run started")
    return _save(fig, path)


def memory(run: RunData, path: Path) -> Path | None:
    """Peak memory per log interval (GPU allocated, or host RSS on CPU) over wall time."""
    t0, stages = _timeline(run)
    stages = [s for s in stages if any("mem_mb" in r for r in s.rows)]
    if not stages:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for s in stages:
        rows = [r for r in s.rows if "time" in r and "mem_mb" in r]
        ax.plot([(r["time"] - t0) / 60 for r in rows], [r["mem_mb"] / 1024 for r in rows], ".-",
                label=f"{s.name} peak memory (rank 0)")
        if any("mem_reserved_mb" in r for r in rows):
            ax.plot([(r["time"] - t0) / 60 for r in rows], [r.get("mem_reserved_mb", 0) / 1024 for r in rows], ":",
                    label=f"{s.name} reserved")
    _mark_attempts(ax, t0, stages)
    ax.set(title="memory", ylabel="GiB", xlabel="minutes since the run started")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {"loss": loss, "learning_rate": learning_rate, "throughput": throughput, "memory": memory}
