"""Stage `finetune`: sequence classification from an adapted model (the parts run_stage needs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dist_train.config.derived import StageDerived
from dist_train.config.schema import RunConfig
from dist_train.data.tasks import (
    Example,
    eval_shard,
    label_set,
    majority_label,
    read_labeled,
    step_indices,
)
from dist_train.model.build import build_classifier, load_tokenizer
from dist_train.train.engine import model_construction
from dist_train.train.loop import StepBatch
from dist_train.train.loss import loss_for
from dist_train.train.stage import StageParts
from dist_train.world import World


def resolve_init_from(cfg: RunConfig) -> str:
    """The HF directory whose weights the fine-tune starts from (weights only)."""
    init = cfg.finetune.init_from
    if init == "pretrain":
        return str(Path(cfg.output_dir) / "pretrain" / "export")
    return init or cfg.model.name_or_path


def build_finetune(cfg: RunConfig, d: StageDerived, world: World) -> StageParts:
    sec = cfg.finetune
    data = sec.data
    init_from = resolve_init_from(cfg)
    tokenizer = load_tokenizer(init_from if (Path(init_from) / "tokenizer_config.json").exists()
                               else cfg.model.tokenizer or cfg.model.name_or_path)
    train = read_labeled(data.train, data.text_field, data.label_field)
    labels = label_set(train)
    label_id = {lab: i for i, lab in enumerate(labels)}
    majority = majority_label(train)
    with model_construction(d.deepspeed):
        model = build_classifier(init_from=init_from, labels=labels, pad_token_id=tokenizer.pad_token_id,
                                 seed=cfg.seed, gradient_checkpointing=sec.train.gradient_checkpointing,
                                 dropout=cfg.model.dropout)

    def encode(examples: list[Example]) -> dict[str, torch.Tensor]:
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=data.max_length,
                        padding=True, return_tensors="pt")  # (B, T) padded to the longest in the batch
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([label_id.get(ex.label, -100) for ex in examples])}

    def batches(start_step: int) -> Iterator[StepBatch]:
        step = start_step
        while True:
            idx = step_indices(step, len(train), d.global_batch_size, cfg.seed, world.world_size, world.rank)
            micro = [encode([train[i] for i in idx[j:j + d.micro_batch_size]])
                     for j in range(0, len(idx), d.micro_batch_size)]
            yield StepBatch(micro, targets=[int((m["labels"] >= 0).sum()) for m in micro],
                            tokens=int(sum(int(m["attention_mask"].sum()) for m in micro)))
            step += 1

    def evaluate_on(engine: Any, examples: list[Example]) -> dict[str, float]:
        engine.train(False)
        shard = eval_shard(len(examples), world.world_size, world.rank)
        correct = loss_sum = count = majority_hits = 0.0
        with torch.no_grad():
            for j in range(0, len(shard), d.micro_batch_size):
                part = shard[j:j + d.micro_batch_size]
                exs = [examples[i] for i, _ in part]
                w = torch.tensor([wt for _, wt in part], dtype=torch.float64)
                batch = encode(exs)
                lab = batch.pop("labels")
                logits = engine.forward(batch).logits.float().cpu()  # (B, C)
                known = (lab >= 0).double() * w  # labels unseen in training count as errors
                loss = torch.nn.functional.cross_entropy(logits, lab.clamp(min=0), reduction="none")
                correct += float(((logits.argmax(-1) == lab).double() * w).sum())
                loss_sum += float((loss.double() * known).sum())
                count += float(w.sum())
                majority_hits += sum(wt for (i, wt) in part if examples[i].label == majority)
        correct, loss_sum, count, majority_hits = world.all_reduce_sum([correct, loss_sum, count, majority_hits])
        return {"accuracy": correct / count, "loss": loss_sum / count, "majority_rate": majority_hits / count,
                "examples": count}

    validation = read_labeled(data.validation, data.text_field, data.label_field) if data.validation else None
    test = read_labeled(data.test, data.text_field, data.label_field) if data.test else None

    def evaluate(engine: Any) -> dict[str, float]:
        return evaluate_on(engine, validation) if validation else {}

    def final(engine: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": labels, "init_from": init_from}
        if test:
            out["test"] = evaluate_on(engine, test)
        return out

    return StageParts(model=model, tokenizer=tokenizer, batches=batches, evaluate=evaluate, final=final,
                      loss_fn=loss_for("classification"), seq_len=data.max_length)
