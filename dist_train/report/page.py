"""`dist-train report OUTPUT_DIR`: a page a person can read, as Markdown (report.md) and optionally
HTML (report.html), with PNG plots in OUTPUT_DIR/report/.

It works on a run in any state: finished, still training (rerun it for a fresh page), preempted
or failed. The page is built as a list of blocks, rendered to either format from the same list.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from dist_train import owned
from dist_train.config.schema import headline as headline_metrics
from dist_train.outputs import write_atomic
from dist_train.report import plots, sections
from dist_train.report.data import RunData, StageData, load_run
from dist_train.report.runs import state_of

PLOT_DIR = "report"
PLOT_KIND = "report plots"
PAGES = {"report.md": "md", "report.html": "html"}
STAMP = "<!-- written by `dist-train report`; rerunning it replaces this file -->"


def _ours(page: Path) -> bool:
    """Whether a report page was written by dist-train (this version's stamp, or an older version's title)."""
    try:
        with open(page, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return STAMP in head or head.startswith("# Run report: ") or "<title>dist_train report: " in head


def _legacy_plots(path: Path) -> bool:
    """An older version's plot directory: nothing but the PNGs it draws."""
    return all(p.is_file() and p.suffix == ".png" and p.stem in plots.PLOTS for p in path.iterdir())
PLOT_TITLES = {"adaptation": "What adaptation bought", "loss": "Loss and evaluation",
               "learning_rate": "Learning rate", "throughput": "Throughput and MFU over time",
               "optimization": "Gradient norm and data wait", "memory": "Memory"}

Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"table"|"img", payload)


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _mapping(value: Any) -> dict:
    """`value` when it is a mapping, else empty: a hand-edited report.json must not take the page down."""
    return value if isinstance(value, dict) else {}


def headline(run: RunData) -> list[Block]:
    state, note = state_of(run)
    cfg, status = run.config, run.status or {}
    model = _mapping(cfg.get("model"))
    arch = _mapping(model.get("arch"))
    what = model.get("name_or_path") or (f"{arch.get('family')} from scratch (hidden {arch.get('hidden_size')}, "
                                         f"{arch.get('num_layers')} layers)" if arch else "-")
    ray = _mapping(cfg.get("ray"))
    started = status.get("started") or min((a["start"] for s in run.stages.values() for a in s.attempts), default=None)
    lines = [f"**State:** {state}{f' ({note})' if note else ''}",
             f"**Stages:** {', '.join(run.stages) or '-'} · **model:** {what} · **workers:** "
             f"{ray.get('num_workers', '-')} × {'GPU' if ray.get('use_gpu') else 'CPU'}",
             f"**Started:** {when(started)} · **last update:** {when(run.updated)} · "
             f"**output_dir:** `{run.out.resolve()}`"]
    return [("h1", f"Run report: {run.out.resolve().name}"), ("p", "  \n".join(lines))]


def summary(run: RunData) -> list[Block]:
    head = ["stage", "steps", "tokens", "tokens/s", "MFU", "final train loss", "goodput", "attempts", "resumed from"]
    rows, evals = [], []
    for s in run.stages.values():
        r = s.result or {}
        last = s.rows[-1] if s.rows else {}
        total = run.max_steps(s.name)
        steps = r.get("steps", s.last_step)
        rows.append([s.name, f"{fmt(steps)}/{fmt(total)}" if total else fmt(steps),
                     fmt(r.get("tokens", last.get("tokens"))),
                     fmt(r.get("tokens_per_s", last.get("tokens_per_s"))),
                     f"{r.get('mfu', last.get('mfu', 0)):.1%}" if (r or last) else "-",
                     fmt(r.get("final_train_loss", last.get("loss"))),
                     f"{r['goodput']:.0%}" if "goodput" in r else "-", fmt(len(s.attempts)),
                     Path(r["resumed_from"]).name if r.get("resumed_from") else "-"])
        for split in ("eval", "test", "test_int8"):
            metrics = r.get(split) or {}
            if not metrics and split == "eval" and s.evals:
                metrics = {k[5:]: v for k, v in s.evals[-1].items() if k.startswith("eval_")}
            if headline_metrics(metrics):  # per-set figures are in the adaptation table
                evals.append([s.name, split, " · ".join(f"{k} {pct(v) if k == 'forgetting' else fmt(v)}"
                                                        for k, v in headline_metrics(metrics).items())])
    blocks: list[Block] = [("h2", "Final metrics"), ("table", (head, rows))]
    unreadable = [f"`{f}`" for s in run.stages.values() for f in s.unreadable]
    if unreadable:
        blocks.append(("p", f"Unreadable (cut short or damaged), so left out: {', '.join(unreadable)}."))
    if evals:
        blocks.append(("table", (["stage", "split", "metrics"], evals)))
    return blocks + sections.safely(sections.exports, run)


def pct(v: Any) -> str:
    return f"{v:+.1%}" if isinstance(v, (int, float)) else "-"


def adaptation(run: RunData, images: dict[str, Path]) -> list[Block]:
    """The adaptation section (adaptation_blocks); entries a damaged result.json garbles are named, not
    rendered, and the rest of the page stands."""
    try:
        return adaptation_blocks(run, images)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return [("h2", PLOT_TITLES["adaptation"]),
                ("p", f"The adaptation entries of pretrain/result.json or finetune/result.json are damaged "
                      f"({type(e).__name__}: {e}): not shown.")]


def adaptation_blocks(run: RunData, images: dict[str, Path]) -> list[Block]:
    """Per evaluation set: before, after, change and forgetting; the verdict; the fine-tune against the
    unadapted model; standard benchmarks. Empty when the run measured none of it."""
    pre = (run.stages["pretrain"].result or {}) if "pretrain" in run.stages else {}
    ft = (run.stages["finetune"].result or {}) if "finetune" in run.stages else {}
    summary, compared, lm = pre.get("adaptation") or {}, ft.get("compare_base") or {}, pre.get("lm_eval") or {}
    if not (summary or compared or lm or "adaptation" in images):
        return []
    blocks: list[Block] = [("h2", PLOT_TITLES["adaptation"])]
    if summary:
        limit = summary.get("max_forgetting")
        ref = f"step {summary['before_step']}"
        if summary.get("head_warmup_steps"):
            ref += (f", after the {summary['head_warmup_steps']}-step head warm-up (the body still the starting "
                    "model's)")
        blocks.append(("p", f"**Continued pretraining:** {summary['summary']} (verdict: {summary['verdict']}). "
                            f"Before: {ref}; after: step {summary['after_step']} (the exported checkpoint)."))
        rows = []
        for name, e in summary["sets"].items():
            b, a, c = e.get("before") or {}, e.get("after") or {}, e.get("change") or {}
            rows.append([name, e["role"], fmt(b.get("perplexity")), fmt(a.get("perplexity")),
                         pct(c.get("perplexity_rel")), fmt(c.get("loss")),
                         (pct(e["forgetting"]) + (" over the limit" if limit is not None and e["forgetting"] > limit
                                                  else "")) if "forgetting" in e else "-"])
        blocks.append(("table", (["set", "role", "perplexity before", "after", "change", "loss change",
                                  "forgetting"], rows)))
    if compared:
        lo, hi = compared["ci95"]
        blocks.append(("p", f"**Fine-tuning, adapted against unadapted** ({compared['base_model']}, same settings "
                            f"and seed): {compared['summary']}."))
        blocks.append(("table", (["test metric", "adapted", "unadapted", "difference", "95% interval (paired "
                                  "bootstrap)", "verdict"],
                                 [[compared["metric"], fmt(compared["adapted"]), fmt(compared["base"]),
                                   f"{compared['difference']:+.4g}", f"{lo:+.4g} to {hi:+.4g}",
                                   compared["verdict"].replace("_", " ")]])))
    if lm:
        rows = [[when, task, " · ".join(f"{k} {fmt(v)}" for k, v in metrics.items() if not k.endswith("_stderr"))]
                for when, tasks in lm.items() for task, metrics in tasks.items()]
        blocks += [("p", "**Standard benchmarks** (lm-evaluation-harness; start: the starting model, end: the "
                         "export):"), ("table", (["model", "task", "metrics"], rows))]
    if "adaptation" in images:
        blocks.append(("img", (f"{PLOT_DIR}/{images['adaptation'].name}", PLOT_TITLES["adaptation"])))
    return blocks


def restarts(run: RunData) -> list[Block]:
    rows = []
    for s in run.stages.values():
        for i, a in enumerate(s.attempts):
            rows.append([s.name, str(i + 1), when(a["start"]), f"{(a['end'] - a['start']) / 60:.1f} min"])
    incidents = [[s.name, when(i.get("time")), i.get("message", "")] for s in run.stages.values()
                 for i in s.incidents]
    ended = [[s.name, str(line)] for s in run.stages.values() if isinstance(s.result, dict)
             and isinstance(s.result.get("attempts_ended"), list) for line in s.result["attempts_ended"]]
    blocks: list[Block] = [("h2", "Attempts and restarts")]
    if not rows:
        return [*blocks, ("p", "No attempt was recorded.")]
    more = sum(max(len(s.attempts) - 1, 0) for s in run.stages.values())
    blocks += [("p", f"{more} restart(s); each is a red dashed line on the plots." if more else "No restarts."),
               ("table", (["stage", "attempt", "started", "wall time"], rows))]
    if ended:
        blocks += [("table", (["stage", "how each attempt ended"], ended))]
    if incidents:
        blocks += [("p", "Incidents (stuck ranks the heartbeat named, errors that ended a worker):"),
                   ("table", (["stage", "time", "what"], incidents))]
    return blocks


def checkpoints(s: StageData) -> list[Block]:
    if not s.checkpoints:
        return [("p", f"{s.name}: no committed checkpoint.")]
    rows = []
    for c in reversed(s.checkpoints):
        marks = ", ".join(m for m, tag in (("latest", s.latest), ("best", s.best)) if tag == c.tag)
        rows.append([c.tag, fmt(c.step), when(c.time), size(c.size_bytes), fmt(c.world_size),
                     " · ".join(f"{k} {fmt(v)}" for k, v in headline_metrics(c.eval).items()) or "-",
                     marks or ""])
    return [("p", f"**{s.name}** (`{s.name}/checkpoints/`):"),
            ("table", (["checkpoint", "step", "written", "size", "workers", "evaluation", ""], rows))]


def build_blocks(run: RunData, images: dict[str, Path]) -> list[Block]:
    blocks = headline(run) + summary(run) + sections.safely(sections.hyperparameters, run)
    blocks += sections.safely(sections.test_details, run)
    blocks += adaptation(run, images)
    for key, title in PLOT_TITLES.items():
        if key in images and key != "adaptation":
            blocks += [("h2", title), ("img", (f"{PLOT_DIR}/{images[key].name}", title))]
    blocks += restarts(run)
    blocks.append(("h2", "Checkpoints kept"))
    for s in run.stages.values():
        blocks += checkpoints(s)
    blocks.append(("p", "Raw data: `<stage>/metrics.jsonl` (one row per log interval), TensorBoard events in "
                        f"`<stage>/tensorboard/` (`tensorboard --logdir {run.out.resolve()}`), `report.json`."))
    return blocks


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' if kind == 'h1' else '##'} {payload}")
        elif kind == "p":
            out.append(payload)
        elif kind == "img":
            out.append(f"![{payload[1]}]({payload[0]})")
        elif kind == "table":
            head, rows = payload
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return STAMP + "\n" + "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """The Markdown the blocks use (**bold**, `code`, line breaks) as HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return text.replace("  \n", "<br>\n")


def to_html(blocks: list[Block], title: str, base: Path | None = None) -> str:
    """The page as one HTML file; with `base` (the run's directory) its images are embedded, so the file
    alone can be mailed or attached to an issue."""
    import base64

    body = []
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(payload)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(payload)}</p>")
        elif kind == "img":
            src = html.escape(payload[0])
            if base is not None and (base / payload[0]).is_file():
                src = "data:image/png;base64," + base64.b64encode((base / payload[0]).read_bytes()).decode()
            body.append(f'<img src="{src}" alt="{html.escape(payload[1])}">')
        elif kind == "table":
            head, rows = payload
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left;font-size:.9em}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
    return (f"<!doctype html>\n{STAMP}\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out: str | Path, formats: tuple[str, ...] = ("md",)) -> list[Path]:
    """Render the report of the run in `out`; returns the files written (pages first, then plots).
    Raises NotARun when `out` holds no run."""
    run = load_run(out)
    plot_dir = run.out / PLOT_DIR
    pages = [run.out / name for name, fmt in PAGES.items() if fmt in formats]
    for page in pages:  # before anything is written: a page of the user's own is never replaced
        if page.exists() and not _ours(page):
            raise owned.OwnershipError(f"{page} exists and was not written by `dist-train report`: move it away, "
                                       "then rerun")
    owned.check_output(plot_dir, PLOT_KIND, legacy=_legacy_plots, what="the report's plot directory")
    tmp = owned.temp_beside(plot_dir)
    try:
        images = {key: path for key, fn in plots.PLOTS.items() if (path := plots.drawn(fn, run, tmp / f"{key}.png"))}
        owned.replace(tmp, plot_dir, PLOT_KIND, legacy=_legacy_plots)  # one rendering's plots, never a mix of two
    finally:
        owned.discard(tmp)
    images = {key: plot_dir / p.name for key, p in images.items()}
    blocks = build_blocks(run, images)
    title = f"dist_train report: {run.out.resolve().name}"
    for page in pages:
        write_atomic(page, to_markdown(blocks) if page.suffix == ".md" else to_html(blocks, title, run.out))
    return pages + sorted(images.values())
