"""The model card (README.md) of an export: where the model came from, what it saw, how it scored, how to load it.

Written from the exported checkpoint's meta.json (its config, step, data and evaluation), so
`dist-train export` of any committed checkpoint writes the same card as the run did; the run
adds the test metrics it measures on the export afterwards. Plain Markdown with the YAML header
the Hugging Face hub reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_train.outputs import write_atomic

CARD = "README.md"
PIPELINES = {"sequence_classification": "text-classification", "multi_label_classification": "text-classification",
             "regression": "text-classification", "token_classification": "token-classification",
             "sft": "text-generation"}
AUTO_CLASSES = {"sequence_classification": "AutoModelForSequenceClassification",
                "multi_label_classification": "AutoModelForSequenceClassification",
                "regression": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification", "sft": "AutoModelForCausalLM"}


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _metrics(values: dict[str, Any] | None) -> str:
    if not isinstance(values, dict):
        return ""
    return ", ".join(f"{k} {_number(v)}" for k, v in values.items() if isinstance(v, int | float)
                     and not isinstance(v, bool))


def card_text(meta: dict[str, Any], export_dir: str, test: dict[str, Any] | None = None) -> str:
    """The card's Markdown for the checkpoint described by `meta`, exported to `export_dir`. Pure."""
    cfg = meta.get("config") or {}
    stage = str(meta.get("stage"))
    section = cfg.get(stage) or {}
    model = cfg.get("model") or {}
    train = section.get("train") or {}
    task = (meta.get("task") or {}).get("name") if stage == "finetune" else None
    base = model.get("name_or_path") or "a model initialised from scratch (model.arch)"
    if stage == "finetune" and section.get("init_from") == "pretrain":
        base = f"{Path(export_dir).parent.parent / 'pretrain' / 'export'} (this run's pretrain stage)"
    elif stage == "finetune" and section.get("init_from"):
        base = f"{section['init_from']} (finetune.init_from)"
    objective = task or section.get("objective") or ""
    pipeline = PIPELINES.get(task or "", "fill-mask" if objective == "masked_lm" else "text-generation")
    auto = AUTO_CLASSES.get(task or "", "AutoModelForMaskedLM" if objective == "masked_lm" else "AutoModelForCausalLM")
    data = section.get("data") or {}
    length = data.get("seq_len") if stage == "pretrain" else data.get("max_length")
    rows = [("stage", f"{stage} ({objective})" if objective else stage),
            ("starting model", str(base)),
            ("checkpoint", f"{meta.get('tag')} (step {meta.get('step')} of {train.get('max_steps')})"),
            ("global batch", str(train.get("global_batch_size"))),
            ("max length", f"{length} tokens (the tokenizer truncates there)"),
            ("precision, ZeRO stage", f"{(section.get('deepspeed') or {}).get('precision')}, "
                                      f"{(section.get('deepspeed') or {}).get('zero_stage')}"),
            ("workers", str(meta.get("world_size"))),
            ("seed", str(cfg.get("seed")))]
    plan = meta.get("plan") or {}
    for corpus in plan.get("corpora") or []:
        if isinstance(corpus, dict):
            rows.append(("data", f"{corpus.get('root')}: {corpus.get('samples')} samples of {length} tokens, "
                                 f"{corpus.get('documents')} documents, manifest sha256 "
                                 f"{str(corpus.get('manifest_sha256'))[:16]}…"))
    if stage == "pretrain" and isinstance(meta.get("step"), int) and isinstance(train.get("global_batch_size"), int) \
            and isinstance(length, int):
        rows.append(("tokens trained", f"{meta['step'] * train['global_batch_size'] * length:,}"))
    if stage == "finetune":
        rows.append(("data", f"train {data.get('train')}"
                             + (f", validation {data.get('validation')}" if data.get("validation") else "")
                             + (f", test {data.get('test')}" if data.get("test") else "")))
        examples = (meta.get("task") or {}).get("examples")
        if isinstance(examples, dict):
            rows.append(("examples", ", ".join(f"{k} {v}" for k, v in examples.items())))
    if _metrics(meta.get("eval")):
        rows.append(("evaluation at this checkpoint", _metrics(meta.get("eval"))))
    if _metrics(test):
        rows.append(("test set (this export)", _metrics(test)))
    rows.append(("trained with", f"dist-train (git {str(meta.get('git_revision'))[:12]})"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    use = "tokenizer(texts, truncation=True, padding=True, return_tensors=\"pt\")"
    if task == "sft":
        use = "tokenizer(prompts, truncation=True, return_tensors=\"pt\")  # keeps the prompt's end, as trained"
    header = f"---\nlibrary_name: transformers\npipeline_tag: {pipeline}\ntags: [dist-train]\n---\n"
    run = Path(export_dir).parent.parent.name or str(export_dir)
    return (f"{header}\n# The {stage} export of the dist-train run {run}\n\n"
            f"| | |\n|---|---|\n{table}\n\n## Load it\n\n```python\n"
            f"from transformers import AutoTokenizer, {auto}\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{export_dir}\")\n"
            f"model = {auto}.from_pretrained(\"{export_dir}\")\n"
            f"batch = {use}\n```\n"
            + ("\nOr `dist-train predict EXPORT_DIR --input FILE.jsonl`, which reads inputs and writes outputs the "
               "way the fine-tune did.\n" if task else ""))


def write_card(directory: Path, meta: dict[str, Any], test: dict[str, Any] | None = None,
               shown: Path | None = None) -> None:
    """Write (or rewrite, adding `test` metrics) the card in `directory`, an export (or the temporary
    directory it is written in: `shown` is then the path the card names)."""
    write_atomic(Path(directory) / CARD, card_text(meta, str(shown or directory), test))


def update_card(export_dir: Path, ckpt_dir: Path, test: dict[str, Any] | None) -> None:
    """Rewrite an export's card with its test metrics (the checkpoint's meta.json gives the rest)."""
    write_card(export_dir, json.loads((Path(ckpt_dir) / "meta.json").read_text()), test)
