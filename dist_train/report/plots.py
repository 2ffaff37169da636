"""The report's PNG plots (matplotlib, Agg: no display needed). Each function writes one file and
returns its path, or None when the run has nothing to plot for it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dist_train.config.schema import CONSOLE_HIDDEN
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


def drawn(fn: Any, run: RunData, path: Path) -> Path | None:
    """fn's plot, or None when the run's files are too damaged to draw it (the page says what it has)."""
    try:
        return fn(run, path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        _plt().close("all")
        return None


def _mark_resumes(ax: Any, stage: StageData) -> None:
    for i, (step, _) in enumerate(stage.resume_points()):
        ax.axvline(step, **RESTART_STYLE, label="restart (resumed here)" if i == 0 else None)


def loss(run: RunData, path: Path) -> Path | None:
    """Train and eval loss per stage over steps, and each stage's other eval metrics; restarts marked."""
    stages = [s for s in run.stages.values() if s.train_rows]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.4 * len(stages)), squeeze=False)
    for (ax, ax_eval), s in zip(axes, stages, strict=True):
        steps, per_step = _step_losses(s)
        if steps:  # every step's loss, light; the interval means on top
            ax.plot(steps, per_step, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss, each step")
        ax.plot([r["step"] for r in s.train_rows], [r["loss"] for r in s.train_rows],
                label="train loss" + (" (each log interval's mean)" if steps else ""), color="tab:blue")
        evals = [r for r in s.evals if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                    color="tab:orange")
        _mark_resumes(ax, s)
        ax.set(title=f"{s.name}: loss", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        others = sorted({k for r in s.evals for k, v in r.items() if k.startswith("eval_") and k != "eval_loss"
                         and "/" not in k and k[5:] not in (*CONSOLE_HIDDEN, "perplexity", "general_perplexity",
                                                           "forgetting") and isinstance(v, (int, float))})
        for key in others:
            points = [r for r in s.evals if key in r]
            ax_eval.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=key[5:])
        if others:
            _mark_resumes(ax_eval, s)
            ax_eval.legend(fontsize=8)
            ax_eval.set(title=f"{s.name}: evaluation", xlabel="step")
            ax_eval.grid(alpha=0.3)
        else:  # an empty 0..1 frame says nothing: say where the stage's evaluation is drawn instead
            ax_eval.axis("off")
            ax_eval.text(0.5, 0.5, f"{s.name}: no evaluation metric besides the loss"
                         + (" (perplexity per set: adaptation.png)" if s.name == "pretrain" else ""),
                         ha="center", va="center", fontsize=9, color="gray", transform=ax_eval.transAxes)
    return _save(fig, path)


def _step_losses(s: StageData) -> tuple[list[int], list[float]]:
    """(step, loss) of every step the rows record (`step_losses`: the interval's steps, oldest first)."""
    steps, losses = [], []
    for r in s.train_rows:
        values = r.get("step_losses")
        if isinstance(values, list):
            first = r["step"] - len(values) + 1
            pairs = [(first + i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
            steps += [p[0] for p in pairs]
            losses += [p[1] for p in pairs]
    return steps, losses


def optimization(run: RunData, path: Path) -> Path | None:
    """Per stage: the gradient norm over steps (log scale) and the share of step time spent waiting for data."""
    stages = [s for s in run.stages.values() if any("grad_norm" in r for r in s.train_rows)]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.2 * len(stages)), squeeze=False)
    for (ax, ax_wait), s in zip(axes, stages, strict=True):
        rows = [r for r in s.train_rows if isinstance(r.get("grad_norm"), (int, float)) and r["grad_norm"] > 0]
        ax.plot([r["step"] for r in rows], [r["grad_norm"] for r in rows], ".-", color="tab:purple")
        ax.set_yscale("log")
        ax.set(title=f"{s.name}: gradient norm (before clipping)", xlabel="step", ylabel="norm (log)")
        rows = [r for r in s.train_rows if isinstance(r.get("data_wait_frac"), (int, float))]
        ax_wait.plot([r["step"] for r in rows], [100 * r["data_wait_frac"] for r in rows], ".-", color="tab:brown")
        ax_wait.set_ylim(bottom=0)
        ax_wait.set(title=f"{s.name}: time waiting for data", xlabel="step", ylabel="% of step time")
        for a in (ax, ax_wait):
            _mark_resumes(a, s)
            a.grid(alpha=0.3, which="both")
    return _save(fig, path)


def learning_rate(run: RunData, path: Path) -> Path | None:
    stages = [s for s in run.stages.values() if s.train_rows]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.2), squeeze=False)
    for ax, s in zip(axes[0], stages, strict=True):
        ax.plot([r["step"] for r in s.train_rows], [r["lr"] for r in s.train_rows], color="tab:green")
        _mark_resumes(ax, s)
        ax.set(title=f"{s.name}: learning rate", xlabel="step", ylabel="lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _timeline(run: RunData) -> tuple[float, list[StageData]]:
    stages = [s for s in run.stages.values() if any("time" in r for r in s.train_rows)]
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


def _mark_setup(ax: Any, run_start: float, stages: list[StageData]) -> None:
    """Hatch the time from each attempt's start to its first logged step: Ray, workers, model, engine."""
    first = True
    for s in stages:
        times = [r["time"] for r in s.train_rows if "time" in r]
        ends = [b["start"] for b in s.attempts[1:]] + [float("inf")]
        for a, end in zip(s.attempts, ends, strict=True):  # an attempt that never logged has no setup to show
            logged = [t for t in times if a["start"] <= t < end]
            if logged:
                ax.axvspan((a["start"] - run_start) / 60, (min(logged) - run_start) / 60, color="gray",
                           alpha=0.15, hatch="//", label="setup until the first logged step" if first
                           else None)
                first = False


def throughput(run: RunData, path: Path) -> Path | None:
    """tokens/s and MFU over wall time (minutes since the run's first attempt), restarts marked."""
    t0, stages = _timeline(run)
    if not stages:
        return None
    plt = _plt()
    fig, (ax, ax_mfu) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for s in stages:
        rows = [r for r in s.train_rows if "time" in r]
        minutes = [(r["time"] - t0) / 60 for r in rows]
        ax.plot(minutes, [r["tokens_per_s"] for r in rows], ".-", label=f"{s.name} tokens/s")
        ax_mfu.plot(minutes, [100 * r["mfu"] for r in rows], ".-", label=f"{s.name} MFU")
    for a in (ax, ax_mfu):
        _mark_attempts(a, t0, stages)
        _mark_setup(a, t0, stages)
        a.set_ylim(bottom=0)  # rates: a dip reads as what it is
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


def adaptation(run: RunData, path: Path) -> Path | None:
    """What adaptation bought: each evaluation set's perplexity from step 0 with the starting model's as a
    dashed line, before/after bars with the relative change, and the fine-tune against the unadapted
    model's with the bootstrap interval."""
    pre = run.stages.get("pretrain")
    sets = pretrain_sets(pre) if pre else {}
    summary = ((pre.result or {}).get("adaptation") or {}) if pre else {}
    compared = ((run.stages["finetune"].result or {}).get("compare_base") or {}) if "finetune" in run.stages else {}
    panels = [name for name, shown in (("curves", sets), ("bars", summary.get("sets")), ("compare", compared)) if shown]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.0), squeeze=False)
    ax_of = dict(zip(panels, axes[0], strict=True))
    if "curves" in ax_of:
        _set_curves(ax_of["curves"], pre, sets, summary)
    if "bars" in ax_of:
        _before_after(ax_of["bars"], summary)
    if "compare" in ax_of:
        _compare_base(ax_of["compare"], compared)
    return _save(fig, path)


def pretrain_sets(stage: StageData) -> dict[str, str]:
    """Evaluation set -> role, from the result (or, while running, from the metric names)."""
    result = (stage.result or {}).get("adaptation") or {}
    if result.get("sets"):
        return {name: e["role"] for name, e in result["sets"].items()}
    names = sorted({k[5:].split("/")[0] for r in stage.evals for k in r if k.startswith("eval_") and "/" in k})
    return dict.fromkeys(names, "domain")


def _set_curves(ax: Any, stage: StageData, sets: dict[str, str], summary: dict[str, Any]) -> None:
    for i, (name, role) in enumerate(sets.items()):
        key = f"eval_{name}/perplexity"
        points = {r["step"]: r[key] for r in stage.evals  # a redone step: its last evaluation
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
        if not points:
            continue
        color = f"C{i}"
        ax.plot(list(points), list(points.values()), "o-", color=color, label=f"{name} ({role})")
        before = ((summary.get("sets") or {}).get(name) or {}).get("before", {}).get("perplexity")
        if before is None and 0 in points:
            before = points[0]
        if before is not None:
            ax.axhline(before, color=color, linestyle="--", linewidth=1, alpha=0.8)
    warm = summary.get("head_warmup_steps")
    if warm:
        ax.axvline(warm, color="gray", linestyle=":", label=f"head warm-up ends (step {warm})")
    _mark_resumes(ax, stage)
    ax.set_yscale("log")
    ax.set(title="pretrain: perplexity per evaluation set\n(dashed: before, the starting model"
                 + (" with its warmed-up head)" if warm else ")"), xlabel="step", ylabel="perplexity (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _before_after(ax: Any, summary: dict[str, Any]) -> None:
    """A bar per set: the relative change of its perplexity from before to after (green when it fell,
    red when it rose), labelled with the two perplexities; the forgetting limit marked on general sets."""
    names = [n for n, e in summary["sets"].items() if e.get("before") and e.get("after")]
    changes = [100 * summary["sets"][n]["change"]["perplexity_rel"] for n in names]
    ax.barh(range(len(names)), changes, color=["tab:green" if c < 0 else "tab:red" for c in changes], height=0.6)
    for y, (n, c) in enumerate(zip(names, changes, strict=True)):
        e = summary["sets"][n]
        ax.annotate(f"{e['before']['perplexity']:.4g} → {e['after']['perplexity']:.4g}", (c, y),
                    xytext=(4 if c >= 0 else -4, 0), textcoords="offset points", va="center",
                    ha="left" if c >= 0 else "right", fontsize=8)
    limit = summary.get("max_forgetting")
    if limit is not None and any(summary["sets"][n]["role"] == "general" for n in names):
        ax.axvline(100 * limit, color="tab:red", linestyle=":", label=f"forgetting limit (+{limit:.0%})")
        ax.legend(fontsize=8, loc="lower right")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), [f"{n}\n({summary['sets'][n]['role']})" for n in names])
    ax.invert_yaxis()
    ax.margins(x=0.45)
    ax.set(title=f"perplexity change, step {summary['before_step']} → {summary['after_step']}\n"
                 f"verdict: {summary.get('verdict', '-')}", xlabel="change (%)")
    ax.grid(alpha=0.3, axis="x")


def _compare_base(ax: Any, c: dict[str, Any]) -> None:
    lo, hi = c["ci95"]
    ax.bar([0, 1], [c["base"], c["adapted"]], color=["tab:gray", "tab:blue"], width=0.6)
    for i, v in enumerate((c["base"], c["adapted"])):
        ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom", fontsize=9)
    ax.set_xticks([0, 1], ["unadapted", "adapted"])
    ax.set(title=f"finetune: test {c['metric']}\ndifference {c['difference']:+.3g}, 95% CI {lo:+.3g} to {hi:+.3g}\n"
                 f"{c['verdict'].replace('_', ' ')}", ylabel=c["metric"])
    ax.grid(alpha=0.3, axis="y")


PLOTS = {"adaptation": adaptation, "loss": loss, "learning_rate": learning_rate, "throughput": throughput,
         "optimization": optimization, "memory": memory}
