"""Inference with an exported model: `dist-train predict EXPORT_DIR --input FILE.jsonl`.

An export carries its task (dist_train_task.json: task name, fields, labels), so inputs are read
the way the fine-tune read them and outputs say what the task means: label and probabilities,
labels, a value, tags per word, or generated text. Plain transformers (and peft for adapter
exports); safetensors only, no remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dist_train.data.manifest import DataError
from dist_train.tasks import TASK_FILE, Task, build_task


def load_export(export_dir: str | Path, device: str = "cpu",
                fields: dict[str, str] | None = None) -> tuple[torch.nn.Module, Any, Task]:
    """(model in eval mode on `device`, tokenizer, task) of an export directory; `fields` renames the
    task's record fields (text_field, label_field, ...)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    export_dir = Path(export_dir)
    info_file = export_dir / TASK_FILE
    if not info_file.is_file():
        raise DataError(f"{export_dir} is not a fine-tune export (no {TASK_FILE}): point at "
                        "<output_dir>/finetune/export")
    info = {**json.loads(info_file.read_text()), **(fields or {})}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
    task = build_task(info["name"], info, tokenizer, train=None)
    auto = getattr(transformers, task.auto_class)
    from dist_train.tasks.quantize import QUANT_FILE, load_int8

    if (export_dir / QUANT_FILE).is_file():  # the int8 copy (CPU only)
        return load_int8(export_dir, task.auto_class), tokenizer, task
    if (export_dir / "adapter_config.json").is_file():  # an adapter export: base model + adapter
        from peft import PeftConfig, PeftModel

        base_dir = PeftConfig.from_pretrained(str(export_dir)).base_model_name_or_path
        base = auto.from_pretrained(base_dir, dtype=torch.float32, **task.model_kwargs())
        model = PeftModel.from_pretrained(base, str(export_dir))
    else:
        model = auto.from_pretrained(str(export_dir), dtype=torch.float32, use_safetensors=True)
    return model.to(device).eval(), tokenizer, task


PRED = "pred_"  # prefix of every key predict adds: a record's own fields (its gold label) are never replaced


def read_inputs(input_path: str, input_format: str, fields: list[str], text_field: str,
                words: bool = False) -> list[dict[str, Any]]:
    """The records to predict: a table file (read_records), text lines (.txt or `text`: one record per
    non-empty line, under `text_field`; split into a list of words with `words`, for token
    classification), or JSON lines on stdin (`-`). A missing field names the flag that maps it."""
    import sys

    from dist_train.tasks.records import read_records

    text = input_format == "text" or (input_format == "auto" and input_path.endswith(".txt"))
    if input_path != "-" and not text:
        records = read_records(input_path, [], keep_all=True)
        _check_fields(input_path, records, fields)
        return records
    source = sys.stdin if input_path == "-" else open(input_path, encoding="utf-8")
    try:
        lines = [line.rstrip("\n") for line in source if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"--input {input_path!r} is not UTF-8 text") from None
    finally:
        if source is not sys.stdin:
            source.close()
    if text:
        records = [{text_field: line.split() if words else line} for line in lines]
    else:
        records = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise DataError(f"--input {input_path!r} line {number} is not a JSON object: give JSON lines, or "
                                "--input-format text for one text per line")
            records.append(row)
    if not records:
        raise DataError(f"--input {input_path!r} holds no records")
    _check_fields(input_path, records, fields)
    return records


def _check_fields(input_path: str, records: list[dict[str, Any]], fields: list[str]) -> None:
    missing = next((f for f in fields for r in records if f not in r or r[f] is None), None)
    if missing is not None:
        raise DataError(f"--input {input_path!r}: a record has no field {missing!r} (the name the fine-tune used): "
                        "name your field with the matching --...-field flag, e.g. --text-field body")


def predict_file(export_dir: str, input_path: str, output: str | None, batch_size: int | None = None,
                 max_new_tokens: int = 64, fields: dict[str, str] | None = None,
                 input_format: str = "auto") -> tuple[int, dict[str, Any] | None]:
    """Write one JSON line per input record (to `output`, or stdout): the record with every field it
    had, plus the prediction under `pred_*` keys. Returns the record count and, when every record
    carries the task's gold labels (not for sft), the task's metrics on them. `fields` renames the
    task's input fields (text_field, label_field, ...: the names the fine-tune used by default);
    `batch_size` defaults to the fine-tune's micro batch, and inputs are truncated as trained."""
    import sys

    import numpy as np

    from dist_train.tasks import task_fields

    model, tokenizer, task = load_export(export_dir, fields=fields)
    info = {**json.loads((Path(export_dir) / TASK_FILE).read_text()), **(fields or {})}
    batch_size = batch_size or int(info.get("batch_size") or 16)
    needed = task_fields(task.name, info)
    inputs_only = needed[:1 if task.name in ("sft", "token_classification") else -1]
    text_field = inputs_only[0]  # a .txt line fills the task's first input: text, prompt, or the words
    records = read_inputs(input_path, input_format, inputs_only, text_field, words=task.name == "token_classification")
    gold = task.name != "sft" and all(f in r and r[f] is not None for r in records for f in needed)
    total: np.ndarray | None = None
    tmp = Path(output).with_name(f".{Path(output).name}.tmp-{os.getpid()}") if output else None
    sink = open(tmp, "w") if tmp else sys.stdout  # the file appears whole, or not at all
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            batch = task.encode(chunk, with_labels=gold)
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                if task.name == "sft":
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                    rows = [{"response": t} for t in texts]
                else:
                    logits = model(**inputs).logits
                    rows = task.predict(logits, batch)
                    if gold:
                        stats = task.stats(logits, batch, np.ones(len(chunk)))
                        total = stats if total is None else total + stats
            for rec, row in zip(chunk, rows, strict=True):
                sink.write(json.dumps({**rec, **{PRED + k: v for k, v in row.items()}}) + "\n")
    except BaseException:
        if tmp:
            sink.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp:
        sink.close()
        os.replace(tmp, output)
    return len(records), (task.metrics(total) if total is not None else None)
