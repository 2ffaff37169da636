"""Stage `finetune`: a task head (or SFT) on the adapted model, full or LoRA (the parts run_stage needs).

The task (dist_train/tasks) says how records become batches, losses, statistics and metrics;
this module reads the data, builds the model, and wires evaluation: every rank evaluates an
equal share, the statistics are summed over ranks, and the test set is evaluated once on the
exported model (loaded back with plain transformers), so the report describes what ships.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_train.config.derived import StageDerived
from dist_train.config.schema import RunConfig
from dist_train.data.tasks import epoch_batches, eval_shard, rank_micro_batches, steps_per_epoch
from dist_train.model.build import build_task_model, load_tokenizer
from dist_train.outputs import TEST_STATS
from dist_train.progress import Progress
from dist_train.tasks import Task, build_task
from dist_train.tasks.batching import Example, compact
from dist_train.tasks.compare import ExampleStats
from dist_train.tasks.records import read_splits, task_spec
from dist_train.train.engine import model_construction
from dist_train.train.loop import StepBatch
from dist_train.train.stage import StageParts, attention_for, checkpointing_for
from dist_train.world import World


def resolve_init_from(cfg: RunConfig) -> str | None:
    """The HF directory whose weights the fine-tune starts from (weights only); None: the inline
    model.arch, freshly initialised."""
    init = cfg.finetune.init_from
    if init == "pretrain":
        return str(Path(cfg.output_dir) / "pretrain" / "export")
    return init or cfg.model.name_or_path


def packs(cfg: RunConfig) -> bool:
    """Whether SFT examples are packed into rows (finetune.data.packing; validated to be sft)."""
    return cfg.finetune.task == "sft" and cfg.finetune.data.packing


def evaluate_records(task: Task, forward: Callable[[dict[str, torch.Tensor]], Any], examples: list[Example],
                     world: World, micro_batch: int, desc: str = "[finetune] eval",
                     per_example: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
    """Metrics of `forward` on `examples` (a task's featurized records): each rank takes an equal share
    (padding rows weigh 0), batched by length so little of it is padding, and the task's statistics are
    summed over ranks, so the result is exact on any worker count. With `per_example` (a dict), each
    of this rank's examples' own statistics are put in it by index."""
    shard = sorted(eval_shard(len(examples), world.world_size, world.rank),
                   key=lambda p: -len(examples[p[0]]["input_ids"]))
    total: np.ndarray | None = None
    batches = -(-len(shard) // micro_batch)
    with torch.no_grad(), Progress(desc, total=batches, unit="batches", enabled=world.is_main) as bar:
        for j in range(0, len(shard), micro_batch):
            bar.update()
            part = shard[j:j + micro_batch]
            batch = task.collate([examples[i] for i, _ in part])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = forward(inputs).logits
            weights = np.array([w for _, w in part], dtype=np.float64)
            s = task.stats(logits, batch, weights)
            total = s if total is None else total + s
            if per_example is not None:  # an example's statistics: the batch's, weighted by it alone
                for k, (i, w) in enumerate(part):
                    if w:
                        per_example[i] = task.stats(logits, batch, np.eye(len(part))[k])
    summed = np.array(world.all_reduce_sum(total.tolist()))
    return task.metrics(summed)


class StepPlan:
    """This rank's micro batches (example indices) at each step: data/tasks.py's pure plan, one epoch
    computed at a time."""

    def __init__(self, n: int, global_batch: int, micro_batch: int, seed: int, world: World,
                 lengths: list[int] | None) -> None:
        self.n, self.global_batch, self.micro_batch, self.seed = n, global_batch, micro_batch, seed
        self.world, self.lengths = world, lengths
        self.spe = steps_per_epoch(n, global_batch)
        self.epoch, self.batches = -1, []  # type: int, list[np.ndarray]

    def __call__(self, step: int) -> list[list[int]]:
        epoch, in_epoch = divmod(step, self.spe)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, epoch_batches(epoch, self.n, self.global_batch, self.seed, self.lengths)
        return rank_micro_batches(self.batches[in_epoch], self.micro_batch, self.world.world_size, self.world.rank,
                                  self.lengths)


def build_finetune(cfg: RunConfig, d: StageDerived, world: World) -> StageParts:
    sec = cfg.finetune
    init_from = resolve_init_from(cfg)
    tokenizer = load_tokenizer(init_from if init_from and (Path(init_from) / "tokenizer_config.json").exists()
                               else cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
    train, validation, test = read_splits(cfg)
    spec = task_spec(cfg)
    task = build_task(sec.task, spec, tokenizer, train)
    # tokenized once per split: a step only pads (or packs) examples it already has
    train_ex, val_ex, test_ex = (compact(task.featurize(split)) if split else []
                                 for split in (train, validation, test))
    lengths = [len(e["input_ids"]) for e in train_ex]
    plan = StepPlan(len(train_ex), d.global_batch_size, d.micro_batch_size, cfg.seed, world,
                    lengths if sec.data.group_by_length else None)
    packed = packs(cfg)
    checkpointing = checkpointing_for(cfg, "finetune", world)
    attention = attention_for(cfg, "finetune", world)
    with model_construction(d.deepspeed):
        model, loaded = build_task_model(task.auto_class, init_from=init_from, model_kwargs=task.model_kwargs(),
                                         pad_token_id=tokenizer.pad_token_id, seed=cfg.seed,
                                         gradient_checkpointing=checkpointing,
                                         dropout=cfg.model.dropout, lora=sec.lora if sec.lora.enabled else None,
                                         peft_task_type=task.peft_task_type,
                                         trust_remote_code=cfg.model.trust_remote_code, arch=cfg.model.arch,
                                         vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                         attention=attention)

    def batches(start_step: int) -> Iterator[StepBatch]:
        step = start_step
        while True:
            micro_ids = plan(step)
            micro = [task.pack([train_ex[i] for i in ids]) if packed else task.collate([train_ex[i] for i in ids])
                     for ids in micro_ids]
            yield StepBatch(micro, targets=[task.targets(m) for m in micro],
                            tokens=sum(lengths[i] for ids in micro_ids for i in ids),  # real tokens, no padding
                            attention_units=sum(lengths[i] ** 2 for ids in micro_ids for i in ids))
            step += 1

    def evaluate(engine: Any) -> dict[str, Any]:
        if not validation:
            return {}
        engine.train(False)
        metrics = evaluate_records(task, engine.forward, val_ex, world, d.micro_batch_size)
        metrics.pop("confusion", None)  # n × n: for the test set's report, not every checkpoint's meta.json
        return metrics

    def final(export_dir: Path) -> dict[str, Any]:
        """After export: the test metrics of the exported model, loaded with plain transformers."""
        out: dict[str, Any] = {"task": sec.task, "init_from": init_from, **task.describe(),
                               "examples": {"train": len(train), "validation": len(validation or []),
                                            "test": len(test or [])}}
        if test:
            from dist_train.tasks.predict import load_export

            model, _, _ = load_export(export_dir, device=world.device)
            own: dict[int, np.ndarray] | None = {} if sec.compare_base else None
            out["test"] = evaluate_records(task, lambda b: model(**{k: v.to(model.device) for k, v in b.items()}),
                                           test_ex, world, d.micro_batch_size, desc="[finetune] test",
                                           per_example=own)
            if own is not None:  # for the paired bootstrap against the unadapted model (launch/compare.py)
                every = world.all_gather_object(ExampleStats.from_dense(own, len(test)))  # sparse: small to send
                if world.is_main:
                    ExampleStats.merged(every).save(export_dir.parent / TEST_STATS)
        if sec.quantize_int8:
            out.update(int8_copy(export_dir, test_ex))
            if test:  # what quantization costs, metric by metric
                out["int8_delta"] = {k: v - out["test"][k] for k, v in out["test_int8"].items()
                                     if isinstance(v, float) and k != "examples"}
        return out

    def int8_copy(export_dir: Path, test: list[Example]) -> dict[str, Any]:
        """export-int8/ beside the export, and its test metrics and their change (CPU inference)."""
        from dist_train.tasks.predict import load_export
        from dist_train.tasks.quantize import load_int8, quantize_dynamic, save_int8

        int8_dir = export_dir.with_name("export-int8")
        if world.is_main:
            save_int8(quantize_dynamic(load_export(export_dir)[0]), export_dir, int8_dir)
        world.barrier()
        result: dict[str, Any] = {"int8_export_dir": str(int8_dir)}
        if test:
            qmodel = load_int8(int8_dir, task.auto_class)
            result["test_int8"] = evaluate_records(task, lambda b: qmodel(**b), test, world, d.micro_batch_size)
        return result

    return StageParts(model=model, tokenizer=tokenizer, batches=batches, evaluate=evaluate, final=final,
                      loss_fn=task.loss, loaded=loaded, checkpointing=checkpointing,
                      export_adapter_only=sec.lora.enabled and sec.lora.export == "adapter",
                      run_info={"task": {"name": sec.task, "peft_task_type": task.peft_task_type, **spec,
                                         **task.describe(), "batch_size": d.micro_batch_size, "examples": {
                                             "train": len(train), "validation": len(validation or []),
                                             "test": len(test or [])}}})
