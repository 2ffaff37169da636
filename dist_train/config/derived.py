"""The ONE place for values that follow from the config: batch arithmetic and the DeepSpeed JSON.

Pure functions of the typed config (and, on resume, the actual worker count). Everything a
worker needs to agree on with its peers is computed here, so the driver can print it before
Ray starts and every rank computes the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dist_train.config.hardware import auto_precision
from dist_train.config.loader import ConfigError
from dist_train.config.schema import (
    DeepSpeedSection,
    FinetuneConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    TrainLoopConfig,
)


@dataclass(frozen=True)
class StageDerived:
    """What a stage computes from its config for a given worker count."""

    stage: str
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum: int  # micro batches per worker per optimizer step
    samples_per_rank: int  # per optimizer step
    seq_len: int  # pretrain: exact; finetune: the truncation length (an upper bound)
    tokens_per_step: int  # pretrain: exact; finetune: upper bound
    lanes: int  # pretrain shard streams (0 for finetune)
    deepspeed: dict[str, Any]

    def summary(self) -> str:
        return (f"[{self.stage}] workers={self.world_size} global_batch={self.global_batch_size} "
                f"micro_batch={self.micro_batch_size} grad_accum={self.grad_accum} "
                f"seq_len={self.seq_len} tokens/step={self.tokens_per_step}"
                + (f" lanes={self.lanes}" if self.lanes else "")
                + f" zero={self.deepspeed['zero_optimization']['stage']} "
                f"precision={_precision(self.deepspeed)}")


def stage_section(cfg: RunConfig, stage: str) -> PretrainConfig | FinetuneConfig:
    section = getattr(cfg, stage, None)
    if section is None:
        raise ConfigError(f"stage {stage!r} is not configured: add a `{stage}:` section to the config")
    return section


def derive_stage(cfg: RunConfig, stage: str, world_size: int | None = None) -> StageDerived:
    """Batch arithmetic and DeepSpeed JSON of one stage; raises ConfigError when they don't fit."""
    section = stage_section(cfg, stage)
    world = world_size or cfg.ray.num_workers
    train = section.train
    per_pass = train.micro_batch_size * world
    if train.global_batch_size % per_pass:
        raise ConfigError(
            f"{stage}.train.global_batch_size={train.global_batch_size} is not divisible by "
            f"micro_batch_size ({train.micro_batch_size}) × workers ({world}) = {per_pass}: "
            f"use a multiple of {per_pass}")
    grad_accum = train.global_batch_size // per_pass
    _check_deepspeed(section.deepspeed, stage)
    if isinstance(section, PretrainConfig):
        seq_len = section.data.seq_len
        lanes = section.data.lanes or cfg.ray.num_workers
        if lanes % world:
            raise ConfigError(f"{stage}.data.lanes={lanes} is not divisible by the {world} workers: "
                              f"use a worker count that divides {lanes}, or set lanes to a multiple of it")
        if train.global_batch_size % lanes:
            raise ConfigError(f"{stage}.train.global_batch_size={train.global_batch_size} is not "
                              f"divisible by {stage}.data.lanes={lanes}: make it a multiple of {lanes}")
    else:
        seq_len = section.data.max_length
        lanes = 0
    return StageDerived(
        stage=stage, world_size=world, global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size, grad_accum=grad_accum,
        samples_per_rank=train.global_batch_size // world, seq_len=seq_len,
        tokens_per_step=train.global_batch_size * seq_len, lanes=lanes,
        deepspeed=fused_only_with_torch_adam(merge_user_json(
            deepspeed_json(section.deepspeed, section.optim, train, grad_accum, cfg.ray.use_gpu,
                           model_hidden_size(cfg)), section.deepspeed.extra, stage)),
    )


def fused_only_with_torch_adam(ds: dict[str, Any]) -> dict[str, Any]:
    """Drop our `fused` default when the user's JSON turns torch_adam off: it is an argument of torch's
    AdamW only, and DeepSpeed's own Adam classes would refuse it."""
    params = ds.get("optimizer", {}).get("params", {})
    if "fused" in params and not params.get("torch_adam"):
        ds = {**ds, "optimizer": {**ds["optimizer"], "params": {k: v for k, v in params.items() if k != "fused"}}}
    return ds


def _check_deepspeed(ds: DeepSpeedSection, stage: str) -> None:
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError(f"{stage}.deepspeed.offload_params needs zero_stage 3 (got {ds.zero_stage}): "
                          "set zero_stage=3 or offload_params=false")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError(f"{stage}.deepspeed.offload_optimizer needs zero_stage >= 1: raise zero_stage")


def model_hidden_size(cfg: RunConfig) -> int:
    """Width of the model's residual stream: the inline arch's, or read from the model's HF config (a
    fine-tune-only config may name its model by finetune.init_from alone)."""
    if cfg.model.arch is not None:
        return cfg.model.arch.hidden_size
    from dist_train.model.build import model_config_value

    source = cfg.model.name_or_path or init_dir(cfg)
    return int(model_config_value(source, "hidden_size"))


def init_dir(cfg: RunConfig) -> str | None:
    """finetune.init_from when it names a model directory (not `pretrain`, not null)."""
    init = cfg.finetune.init_from if cfg.finetune is not None else None
    return init if init not in (None, "pretrain") else None


# Smallest gradient-reduce bucket (elements). hidden² alone (HF Trainer's "auto") makes ~100 tiny
# collectives per step for a 30M model, and each pays a fixed latency: on 2 gloo ranks a step took
# 1.23x as long as with this floor (bench/mfu.py measures it). 2.5e7 bf16 elements are 50 MB.
MIN_REDUCE_BUCKET = 25_000_000


def reduce_bucket_elements(hidden_size: int) -> int:
    """The gradient-reduce bucket ZeRO uses by default: the model's width squared, at least MIN_REDUCE_BUCKET."""
    return max(hidden_size**2, MIN_REDUCE_BUCKET)


def stage_precision(ds: DeepSpeedSection, use_gpu: bool) -> tuple[str, str]:
    """The precision a stage computes in, and why: `deepspeed.precision` unless it is auto; auto follows the
    user's DeepSpeed JSON (config_file or extra) where it enables bf16 or fp16, else the hardware."""
    if ds.precision != "auto":
        return ds.precision, "deepspeed.precision"
    said = {name: block.get("enabled") for name in ("bf16", "fp16") if isinstance(block := ds.extra.get(name), dict)}
    for name, enabled in said.items():
        if enabled is True:
            return name, f"auto: your DeepSpeed JSON enables {name}"
    if said.get("bf16") is False:
        return "fp32", "auto: your DeepSpeed JSON disables bf16"
    return auto_precision(use_gpu)


def deepspeed_json(ds: DeepSpeedSection, optim: OptimConfig, train: TrainLoopConfig, grad_accum: int,
                   use_gpu: bool, hidden_size: int) -> dict[str, Any]:
    """Render the DeepSpeed config dict that `deepspeed.initialize` receives, complete and explicit."""
    precision = stage_precision(ds, use_gpu)[0]  # the driver has made it concrete; other callers may not have
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # Bucket sizes follow the model's width (hidden², as HF Trainer's "auto"), with a floor for small
        # models: DeepSpeed's fixed defaults allocate a 5e8-element buffer even for a tiny model.
        # overlap_comm helps only where a side stream exists (GPU); on CPU it measured 5–8% slower.
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True,
                    reduce_bucket_size=reduce_bucket_elements(hidden_size))
    if ds.zero_stage == 3:
        # prefetch about one transformer block ahead (12·h² parameters: attention 4h², MLP ~8h²), so
        # the next block's gather overlaps this one's compute; HF's "auto" (0.9·h²) is a tenth of a block
        zero.update(stage3_prefetch_bucket_size=12 * hidden_size**2,
                    stage3_param_persistence_threshold=10 * hidden_size)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
            "weight_decay": optim.weight_decay,
            # torch's fused AdamW (one kernel over all tensors, CPU and GPU) instead of DeepSpeed's
            # FusedAdam: as fast, and no JIT build of a C++/CUDA op (which needs nvcc on GPU). With
            # offload DeepSpeed's CPU Adam runs the step instead.
            **({} if ds.offload_optimizer else {"torch_adam": True, "fused": True})}},
        "scheduler": _scheduler(optim, train.max_steps),
        "steps_per_print": 10**9,  # we log ourselves, once, on rank 0
        "wall_clock_breakdown": False,
    }


# Where a rendered DeepSpeed key comes from in the typed config, to name both sides of a conflict.
TYPED_SOURCE = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size × workers)",
    "gradient_clipping": "optim.grad_clip", "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "deepspeed.precision", "fp16.enabled": "deepspeed.precision",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_params", "optimizer.params.lr": "optim.lr",
    "optimizer.params.weight_decay": "optim.weight_decay", "optimizer.params.eps": "optim.eps",
    "optimizer.params.betas": "optim.beta1/beta2", "scheduler": "optim.schedule/warmup_steps",
}


def merge_user_json(rendered: dict[str, Any], user: dict[str, Any], stage: str, path: str = "") -> dict[str, Any]:
    """`rendered` with the user's own DeepSpeed keys merged in.

    A key that comes from a typed field (TYPED_SOURCE) must agree, or be "auto" (HF's convention
    for "take it from the config"): anything else is a ConfigError naming both values, because the
    typed config is what the rest of the run reads. Keys we only default (bucket sizes, loss-scale
    window, overlap_comm...) are the user's to tune: their value wins.
    """
    out = dict(rendered)
    for key, value in user.items():
        dotted = f"{path}{key}"
        ours = out.get(key)
        typed = next((v for k, v in TYPED_SOURCE.items() if dotted == k or dotted.startswith(k + ".")), None)
        if value == "auto" and key in out:
            continue
        if isinstance(value, dict) and isinstance(ours, dict):
            out[key] = merge_user_json(ours, value, stage, dotted + ".")
        elif typed is not None and key in out and value != ours and not _same_number(value, ours):
            raise ConfigError(f"{stage}.deepspeed: your DeepSpeed JSON sets {dotted}={json.dumps(value)} but "
                              f"the typed config gives {json.dumps(ours)} (from {stage}.{typed}): "
                              f"set the typed key instead, or make the two agree")
        elif typed is not None and key not in out:  # e.g. offload_optimizer, which we render only when on
            raise ConfigError(f"{stage}.deepspeed: your DeepSpeed JSON sets {dotted}={json.dumps(value)}, which "
                              f"the typed config leaves off ({stage}.{typed}): set the typed key instead")
        else:
            out[key] = value
    return out


def _same_number(a: Any, b: Any) -> bool:
    nums = (int, float)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(x == y or _same_number(x, y) for x, y in zip(a, b, strict=True))
    return isinstance(a, nums) and isinstance(b, nums) and not isinstance(a, bool) and float(a) == float(b)


def _scheduler(optim: OptimConfig, max_steps: int) -> dict[str, Any]:
    warmup = min(optim.warmup_steps, max_steps)
    if optim.schedule == "cosine":
        # DeepSpeed refuses 0 warmup steps: no warmup is a "warmup" whose ratio starts at 1 (the full rate)
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max_steps, "warmup_num_steps": max(warmup, 1), "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if warmup else 1.0, "cos_min_ratio": optim.min_lr_ratio}}
    if optim.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max_steps, "warmup_num_steps": max(warmup, 1), "warmup_type": "linear",
            "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr}}
    return {"type": "WarmupLR", "params": {
        "warmup_num_steps": max(warmup, 1), "warmup_type": "linear", "warmup_min_lr": 0.0,
        "warmup_max_lr": optim.lr}}


def _precision(ds_json: dict[str, Any]) -> str:
    if ds_json["bf16"]["enabled"]:
        return "bf16"
    return "fp16" if ds_json["fp16"]["enabled"] else "fp32"


def describe(cfg: RunConfig, stages: list[str]) -> str:
    """The derived values printed at start, one line per stage."""
    return "\n".join(derive_stage(cfg, s).summary() for s in stages)


__all__ = ["StageDerived", "deepspeed_json", "derive_stage", "describe", "merge_user_json", "stage_section"]
