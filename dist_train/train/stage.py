"""Run one stage on one worker: build everything, resume if this run has a checkpoint, loop, export.

The stage-specific parts (model, data, evaluation) come from train/pretrain.py and
train/finetune.py as a `StageParts`; the sequence around them is the same for both stages.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.card import update_card
from dist_train.checkpoint.export import EXPORT_PHASES, describe_model, export_checkpoint
from dist_train.checkpoint.manager import CheckpointManager, best_committed, restore_rng
from dist_train.config.derived import StageDerived, stage_precision
from dist_train.config.loader import to_dict
from dist_train.config.schema import RunConfig, best_metric, higher_is_better
from dist_train.control import preemption_requested
from dist_train.data.ledger import Ledger, gather
from dist_train.data.stream import Prefetcher
from dist_train.faults import Faults
from dist_train.model.build import LoadReport, flops_model, new_parameters
from dist_train.outputs import ATTEMPTS, METRICS, RESULT, write_atomic
from dist_train.progress import Progress
from dist_train.train import adaptation
from dist_train.train.engine import build_engine
from dist_train.train.head_warmup import HEAD_LR_SCALE, HeadWarmup, warmup_steps
from dist_train.train.heartbeat import Heartbeat
from dist_train.train.loop import (
    AnyOf,
    Cadence,
    EarlyStopping,
    ForgettingLimit,
    NonFiniteGuard,
    NonFiniteLoss,
    StepBatch,
    TrainState,
    train_loop,
)
from dist_train.train.loss import LossFn
from dist_train.train.metrics import MetricsLog, RunClock, Throughput, device_peak_flops, goodput
from dist_train.world import World


@dataclass
class StageParts:
    """What differs between stages, built before the loop starts."""

    model: torch.nn.Module
    tokenizer: Any
    batches: Callable[[int], Iterator[StepBatch]]  # start step -> this rank's step batches
    evaluate: Callable[[Any], dict[str, float]]  # engine -> metrics (collective)
    final: Callable[[Path], dict[str, Any]]  # export dir -> extra result entries (e.g. test metrics)
    loss_fn: LossFn  # (logits, labels) -> loss summed over the targets
    run_info: dict[str, Any] = field(default_factory=dict)  # recorded in every checkpoint's meta.json
    export_adapter_only: bool = False  # LoRA: export the adapter alone instead of merging it
    loaded: LoadReport = field(default_factory=LoadReport)  # what loading the starting weights found
    eval_roles: dict[str, str] = field(default_factory=dict)  # pretrain: evaluation set -> domain | general
    baseline: bool = False  # evaluate at step 0, before the first update
    max_forgetting: float | None = None
    stop_on_forgetting: bool = False
    carry_unused: bool = False  # the export keeps the starting checkpoint's unused weights (BERT's pooler)
    checkpointing: bool = False  # activation checkpointing as built (gradient_checkpointing auto resolved)


def _earlier_export(path: Path) -> bool:
    """The stage's own export from a dist-train version before export markers: OUTPUT_DIR/<stage>/export
    beside the stage's checkpoints, holding a model."""
    return path.name == "export" and (path.parent / "checkpoints").is_dir() and (path / "config.json").is_file()


def worker_memory(use_gpu: bool, world: World) -> float:
    """Bytes one worker may use: its GPU's memory, or on CPU its share of the host's."""
    if use_gpu and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(world.local_world_size, 1)


def checkpointing_for(cfg: RunConfig, stage: str, world: World) -> bool:
    """Whether this stage recomputes activations: as configured, or for `auto` as the stage's memory
    plan decides on rank 0's worker memory (every rank takes rank 0's answer), said on the console."""
    setting = getattr(cfg, stage).train.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    choice = None
    if world.is_main:
        from dist_train.config.sizing import AUTO_CHECKPOINTING_SHARE, auto_checkpointing

        capacity = worker_memory(cfg.ray.use_gpu, world)
        try:
            choice, need = auto_checkpointing(cfg, stage, capacity)
        except Exception as e:  # a model the plan cannot size: the safe choice
            choice = True
            print(f"[{stage}] gradient checkpointing on (auto: the memory plan failed: {str(e)[:120]})", flush=True)
        else:
            print(f"[{stage}] gradient checkpointing {'on' if choice else 'off'} (auto: {need / 2**30:.2f} GiB per "
                  f"worker without it, {'over' if choice else 'within'} {AUTO_CHECKPOINTING_SHARE:.0%} of "
                  f"{capacity / 2**30:.1f} GiB)", flush=True)
    return bool(world.broadcast_object(choice))


def attention_for(cfg: RunConfig, stage: str, world: World) -> str:
    """The attention kernel this stage builds its model with (model/attention.py), said on the console
    by rank 0 when model.attention is auto."""
    from dist_train.model.attention import choose_attention, flash_attn_importable

    on_gpu = cfg.ray.use_gpu and torch.cuda.is_available()
    precision = stage_precision(getattr(cfg, stage).deepspeed, cfg.ray.use_gpu)[0]
    kernel, why = choose_attention(cfg.model.attention, on_gpu=on_gpu, precision=precision,
                                   flash_available=flash_attn_importable())
    if world.is_main and cfg.model.attention == "auto":
        print(f"[{stage}] attention: {kernel} ({why})", flush=True)
    return kernel


def after_step(step: int, heartbeat: Heartbeat | None, faults: Faults | None) -> None:
    if heartbeat is not None:
        heartbeat.progress(step)
    if faults is not None:
        faults.after_step(step)


def precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def run_stage(cfg: RunConfig, stage: str, d: StageDerived, world: World, parts: StageParts,
              attempt: float, heartbeat: Heartbeat | None = None, started: float | None = None) -> dict[str, Any]:
    """Train one stage to its max_steps and export it; returns the stage's report entry.
    Stopped by a preemption request, it returns {"preempted": True, ...} after a checkpoint instead.
    `attempt` identifies this start of the worker group (the same value on every rank); `started`:
    when this worker began (before the model and data were built), for the setup line."""
    t_start = time.time()
    from dist_train.config.checks import resolve_precision

    cfg = resolve_precision(cfg)  # the driver has; a caller of its own may not: checkpoints keep a concrete one
    section = getattr(cfg, stage)
    out = Path(cfg.output_dir) / stage
    metric = best_metric(cfg, stage)
    higher = higher_is_better(metric or "", section.train.best_mode)
    clock = RunClock(out / ATTEMPTS) if world.is_main else None  # counts setup too
    ledger = Ledger(world.rank, world.world_size, attempt=attempt)
    faults = Faults(cfg.faults, Path(cfg.output_dir), stage, world.rank) if cfg.faults.active() else None
    ckpt = CheckpointManager(out / "checkpoints", world, section.train.keep_checkpoints,
                             run_info={"stage": stage, "config": to_dict(cfg), **parts.run_info}, ledger=ledger,
                             describe=lambda d: describe_model(parts.model, parts.tokenizer, d,
                                                               parts.run_info.get("task")),
                             best_metric=metric, higher_is_better=higher, faults=faults)
    tag = ckpt.resume_tag()
    ds_config, load_dir = d.deepspeed, ckpt.root
    if tag is not None:
        load_dir, universal = ckpt.load_source(tag)  # converted when the worker count changed
        ds_config = {**ds_config, "checkpoint": {"load_universal": universal}}
    head = new_parameters(parts.model, parts.loaded.new)
    head_steps = warmup_steps(section.train.head_warmup_steps, section.train.max_steps, bool(head),
                              auto=stage == "pretrain")
    if tag is not None:  # the warm-up this run started with (max_steps may have changed); 0 before warm-ups
        head_steps = world.broadcast_object(ckpt.meta(tag).get("head_warmup_steps", 0) if world.is_main else None)
    ckpt.run_info["head_warmup_steps"] = head_steps  # every checkpoint records it
    t_engine = time.time()
    engine = build_engine(parts.model, ds_config, section.optim.weight_decay, head if head_steps else None,
                          chunked_loss=section.train.chunked_loss)
    state = TrainState()
    resumed_from = None
    if tag is not None:
        client = engine.load(str(load_dir), tag)
        state.load_state_dict(client["train_state"])
        restore_rng(load_dir / tag, world.rank)
        resumed_from = str(ckpt.root / tag)
        if world.is_main:
            gather(ckpt.root / tag, out)  # in case the last run stopped between commit and gather
            print(f"[{stage}] resumed from {resumed_from} at step {state.step} "
                  f"(written by {ckpt.meta(tag)['world_size']} workers, now {world.world_size})", flush=True)
    warm = None
    if head_steps:
        head_ids = {id(p) for p in head}
        body = [p for p in parts.model.parameters() if p.requires_grad and id(p) not in head_ids]
        warm = HeadWarmup(engine, body, head_steps, section.optim.warmup_steps,
                          section.train.head_lr or HEAD_LR_SCALE * section.optim.lr)
        warm.at(state.step)
    if world.is_main and started is not None:
        print(f"[{stage}] {world.world_size} workers ready {time.time() - started:.1f} s after they started: model and "
              f"data {t_start - started:.1f} s, DeepSpeed engine {time.time() - t_engine:.1f} s"
              + (f" (checkpoint {tag} loaded)" if tag else ""), flush=True)
    if world.is_main and (line := parts.loaded.new_line(stage)):
        print(line + (f"; only they train for the first {head_steps} steps (train.head_warmup_steps), then "
                      "everything" if head_steps else ""), flush=True)

    precision = stage_precision(section.deepspeed, cfg.ray.use_gpu)[0]
    peak, peak_source = device_peak_flops(cfg.ray.use_gpu, precision_dtype(precision),
                                          cfg.ray.cpus_per_worker)
    flops = flops_model(parts.model)
    log = MetricsLog(out / METRICS if world.is_main else None, stage, section.train.max_steps,
                     sys.stdout if world.is_main else None, tensorboard=out / "tensorboard", clock=clock,
                     start_step=state.step, attempt=attempt)
    throughput = Throughput(skip=1)
    warned: list[bool] = []

    def evaluate() -> dict[str, float]:
        """The stage's evaluation; pretrain adds forgetting against the starting model, and keeps the
        evaluation that ends a head warm-up as that reference."""
        evaluation = parts.evaluate(engine)
        if not parts.eval_roles:
            return evaluation
        if head_steps and state.step == head_steps:
            state.reference, state.reference_step = evaluation, state.step
        scored = adaptation.score(evaluation, state.reference or None, parts.eval_roles, parts.max_forgetting)
        limit = parts.max_forgetting
        if world.is_main and limit is not None and scored.get("forgetting", 0.0) > limit and not warned:
            warned.append(True)
            print(f"[{stage}] warning: at step {state.step} the general sets' perplexity is "
                  f"{scored['forgetting']:+.1%} over the starting model's (pretrain.eval.max_forgetting={limit:.0%}): "
                  "lower the learning rate, raise the replay share (pretrain.data.mix weights), or stop here "
                  "(pretrain.eval.stop_on_forgetting)", flush=True)
        return scored

    if parts.baseline and state.step == 0 and not state.baseline:
        state.baseline = evaluate()
        if not head_steps:
            state.reference, state.reference_step = state.baseline, 0
        log.log({"step": 0, "phase": "baseline (the starting model)",
                 **{f"eval_{k}": v for k, v in state.baseline.items()}})
    batches = Prefetcher(parts.batches(state.step))
    t_loop = time.time()

    def save(step: int) -> None:
        if heartbeat is not None:
            heartbeat.progress(step, "checkpoint")
        ckpt.save(engine, step, {"train_state": state.state_dict(), "data_state": {"next_step": step}},
                  evaluation=state.last_eval if state.eval_step == step else None)

    def stepped(step: int) -> None:
        if warm is not None:
            warm.at(step)
        after_step(step, heartbeat, faults)

    rules = []
    if section.train.early_stopping_patience and metric:
        rules.append(EarlyStopping(metric, higher, section.train.early_stopping_patience,
                                   section.train.early_stopping_min_delta))
    if parts.stop_on_forgetting and parts.max_forgetting is not None:
        rules.append(ForgettingLimit(parts.max_forgetting))
    try:
        train_loop(engine=engine, batches=batches, loss_fn=parts.loss_fn, state=state,
                   cadence=Cadence(section.train.max_steps, section.train.log_every, section.train.eval_every,
                                   section.train.save_every, also_eval=(head_steps,) if head_steps else ()),
                   evaluate=evaluate, save=save, log=log, ledger=ledger, world=world,
                   flops=flops, peak_flops=peak, throughput=throughput,
                   early_stopping=AnyOf(tuple(rules)) if rules else None,
                   stop_requested=lambda: preemption_requested(cfg.output_dir), after_step=stepped,
                   nonfinite=NonFiniteGuard(section.train.nonfinite_patience))
    except NonFiniteLoss as e:
        log.close()
        good = f"the last good checkpoint is {ckpt.root / ckpt.latest}" if ckpt.latest else "no checkpoint was saved"
        raise NonFiniteLoss(f"[{stage}] {e}: stopped, nothing of those steps was saved; {good}. Lower "
                            f"{stage}.optim.lr (or raise warmup), check the data, then rerun") from None
    log.close()
    if state.preempted:
        result = {"preempted": True, "steps": state.step, "checkpoint": ckpt.latest}
        if world.is_main:
            clock.tick()
            write_atomic(out / RESULT, json.dumps(result, indent=1))
            print(f"[{stage}] preempted: checkpoint {ckpt.latest} committed at step {state.step}", flush=True)
        return result
    if heartbeat is not None:
        heartbeat.progress(state.step, "export")
    t_export = time.time()
    export_dir = out / "export"
    exported = ckpt.latest
    if section.train.export == "best":
        exported = world.broadcast_object(best_committed(ckpt.root) if world.is_main else None) or ckpt.latest
    world.barrier()
    if world.is_main:
        with Progress(f"[{stage}] export {exported}", total=EXPORT_PHASES, unit="phases") as bar:
            export_checkpoint(ckpt.root / exported, export_dir, adapter_only=parts.export_adapter_only, progress=bar,
                              carry=(parts.loaded.source, parts.loaded.unused) if parts.carry_unused else None,
                              legacy=_earlier_export, dtype=section.train.export_dtype)
    world.barrier()
    extra = parts.final(export_dir)
    if world.is_main and extra.get("test"):
        update_card(export_dir, ckpt.root / exported, extra["test"])  # the card gains the export's test metrics
    tps = throughput.tokens_per_s
    result = {
        "world_size": world.world_size, "zero_stage": section.deepspeed.zero_stage,
        "precision": precision,
        "gradient_checkpointing": parts.checkpointing, "steps": state.step,
        "tokens": state.tokens, "tokens_per_s": tps, "mfu": throughput.flops_per_s / (peak * world.world_size),
        "flops_per_token": throughput.flops_per_token, "peak_flops_per_worker": peak, "peak_source": peak_source,
        "final_train_loss": state.last_loss, "replaced_samples": state.replaced_samples, "eval": state.last_eval,
        "skipped_steps": engine.skipped_steps,
        "export_dir": str(export_dir), "exported_checkpoint": exported,
        "stopped_early": state.stopped_early, "best_metric": metric,
        "new_parameters": list(parts.loaded.new), "head_warmup_steps": head_steps,
        "resumed_from": resumed_from, "data_wait_frac": batches.wait_s / max(time.time() - t_loop, 1e-9),
        **extra,
        "timings": {"setup_s": t_loop - t_start, "train_s": t_export - t_loop,
                    "export_s": time.time() - t_export},
    }
    if world.is_main:
        clock.tick()
        result.update(goodput(state.tokens, tps, clock))
        if parts.eval_roles and state.reference:
            result["baseline"] = state.baseline
            result["adaptation"] = adaptation_of(state, ckpt.meta(exported), parts, head_steps)
        write_atomic(out / RESULT, json.dumps(result, indent=1))
    return result


def adaptation_of(state: TrainState, exported: dict[str, Any], parts: StageParts, head_steps: int) -> dict[str, Any]:
    """Before (the starting model) against after: the evaluation of the exported checkpoint, which is
    what ships, or the last evaluation when that checkpoint was not evaluated at its step."""
    after, after_step = state.last_eval, state.eval_step
    if exported.get("eval"):
        after, after_step = exported["eval"], int(exported["step"])
    return adaptation.summarize(state.reference, state.reference_step, after, after_step, parts.eval_roles,
                                parts.max_forgetting, head_steps)
