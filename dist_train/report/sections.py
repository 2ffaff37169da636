"""Report sections a practitioner looks for after the headline: the settings each stage ran with,
the fine-tune's per-class scores and confusion matrix, and every model directory the run wrote.

Each function returns page blocks (see page.py) from what the run left on disk, and nothing when
the run has nothing of that kind; a damaged file leaves its section out, never the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dist_train.report.data import RunData

Block = tuple[str, Any]

SETTINGS = (  # (label, path in the stage's config section)
    ("max_steps", ("train", "max_steps")), ("global batch", ("train", "global_batch_size")),
    ("micro batch", ("train", "micro_batch_size")), ("learning rate", ("optim", "lr")),
    ("schedule", ("optim", "schedule")), ("warmup steps", ("optim", "warmup_steps")),
    ("weight decay", ("optim", "weight_decay")), ("ZeRO stage", ("deepspeed", "zero_stage")),
    ("precision", ("deepspeed", "precision")), ("gradient checkpointing", ("train", "gradient_checkpointing")),
    ("objective", ("objective",)), ("task", ("task",)), ("sequence length", ("data", "seq_len")),
    ("max length", ("data", "max_length")), ("LoRA", ("lora", "enabled")), ("export", ("train", "export")),
)


def safely(section: Callable[[RunData], list[Block]], run: RunData) -> list[Block]:
    """A section's blocks, or none when a file it reads holds something odd (a hand-edited or damaged
    report.json, result.json): the rest of the page is still written."""
    try:
        return section(run)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return []


def _get(section: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        section = section.get(key) if isinstance(section, dict) else None
    return section


def _count(v: Any) -> str:
    return str(round(v)) if isinstance(v, int | float) and math.isfinite(v) else "-"


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def _auto(setting: Any, chosen: Any) -> Any:
    if setting == "auto" and isinstance(chosen, bool):
        return f"auto ({'on' if chosen else 'off'})"
    return setting


def hyperparameters(run: RunData) -> list[Block]:
    """One row per setting, one column per stage (only settings some stage has)."""
    stages = [s for s in run.stages if isinstance(run.config.get(s), dict)]
    if not stages:
        return []
    rows = []
    for label, path in SETTINGS:
        values = [_get(run.config[s], path) for s in stages]
        if path == ("train", "gradient_checkpointing"):  # auto: what the workers chose, from result.json
            values = [_auto(v, (run.stages[s].result or {}).get("gradient_checkpointing")) for s, v in zip(
                stages, values, strict=True)]
        if any(v is not None for v in values):
            rows.append([label, *map(_show, values)])
    ray = run.config.get("ray") or {}
    rows += [["workers", *[_show(ray.get("num_workers"))] * len(stages)],
             ["seed", *[_show(run.config.get("seed"))] * len(stages)]]
    return [("h2", "Settings"), ("table", (["setting", *stages], rows))]


def test_details(run: RunData) -> list[Block]:
    """Per-class precision, recall, F1 and support, and the confusion matrix, of the fine-tune's test set."""
    stage = run.stages.get("finetune")
    test = ((stage.result or {}).get("test") if stage is not None else None) or {}
    per_class, confusion = test.get("per_class"), test.get("confusion")
    blocks: list[Block] = []
    if isinstance(per_class, dict) and per_class:
        rows = [[str(label), *(_show(v.get(k)) for k in ("precision", "recall", "f1")), _count(v.get("support"))]
                for label, v in per_class.items() if isinstance(v, dict)]
        blocks += [("h2", "Fine-tune: the test set, class by class"),
                   ("table", (["class", "precision", "recall", "F1", "support"], rows))]
    if isinstance(confusion, dict) and isinstance(confusion.get("counts"), list):
        labels, gold = confusion.get("labels") or [], confusion.get("gold_labels") or []
        rows = [[str(g), *(_count(c) for c in row)] for g, row in zip(gold, confusion["counts"], strict=False)
                if isinstance(row, list)]
        blocks += [("p", "Confusion matrix (rows: the true class; columns: the predicted one):"),
                   ("table", (["true ↓ predicted →", *map(str, labels)], rows))]
    return blocks


def exports(run: RunData) -> list[Block]:
    """Every model directory the run wrote: each stage's export, the int8 copy, the unadapted model's
    fine-tune (compare_base), with what each is for."""
    rows = []
    for s in run.stages.values():
        r = s.result if isinstance(s.result, dict) else {}
        if r.get("export_dir"):
            rows.append([s.name, f"`{r['export_dir']}`", str(r.get("exported_checkpoint", "-")),
                         "Hugging Face model (README.md: its card)"])
        if r.get("int8_export_dir"):
            rows.append([s.name, f"`{r['int8_export_dir']}`", str(r.get("exported_checkpoint", "-")),
                         "int8 copy for CPU inference (dist-train predict)"])
        base = r.get("compare_base") if isinstance(r.get("compare_base"), dict) else {}
        if base.get("base_export_dir"):
            rows.append([f"{s.name} (compare_base)", f"`{base['base_export_dir']}`", "-",
                         "the unadapted model's fine-tune, for the comparison"])
    if not rows:
        return []
    return [("p", "Model directories written:"), ("table", (["stage", "directory", "from", "what"], rows))]
