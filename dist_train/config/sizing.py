"""`dist-train validate CONFIG --plan`: what each rank will hold, sized before any cluster exists.

The model is built on PyTorch's meta device (its shapes, no memory, no weights read), so the
parameter counts are exact; the memory figures follow memory.py (the ZeRO paper's arithmetic for
model states, Korthikanti et al. for activations) and are estimates: allocator fragmentation and
library workspaces come on top, which is why a plan only "fits" with 10% of the device left free.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from dist_train.config.derived import derive_stage, stage_precision, stage_section
from dist_train.config.loader import ConfigError
from dist_train.config.memory import (
    ActivationBytes,
    ArchShape,
    ModelStateBytes,
    activation_bytes,
    checkpoint_bytes,
    model_state_bytes,
    zero_buffer_bytes,
)
from dist_train.config.schema import FinetuneConfig, PretrainConfig, RunConfig

GiB = 2**30
FRAMEWORK_GPU_BYTES = 2 * GiB  # CUDA context, NCCL communicators and cuBLAS workspaces, per GPU
HEADROOM = 0.9  # fraction of device memory a plan may use: fragmentation and workspaces need the rest
AUTO_CHECKPOINTING_SHARE = 0.75  # gradient_checkpointing auto: off when the stage needs at most this share without
GATED = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo", "olmo2"}


def parse_memory(text: str) -> float:
    """'80GB', '80G', '80GiB', '141' (GiB) -> bytes. GB means GiB here, as GPU vendors use it."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|tib|tb|t|mib|mb|m)?\s*", text.lower())
    if not m:
        raise ConfigError(f"--gpu-memory {text!r} is not a size: write e.g. 80GB or 141GiB")
    unit = (m.group(2) or "g")[0]
    return float(m.group(1)) * {"m": 2**20, "g": GiB, "t": 2**40}[unit]


@dataclass(frozen=True)
class Hardware:
    """The allocation a plan is for; None fields come from the config (ray.num_workers)."""

    nodes: int = 1
    gpus_per_node: int | None = None
    gpu_memory: float | None = None  # bytes per GPU


@dataclass
class StagePlan:
    stage: str
    section: PretrainConfig | FinetuneConfig  # batch, checkpointing, ZeRO and offload as configured
    world: int
    nodes: int
    on_gpu: bool
    shape: ArchShape
    trainable: int
    states: ModelStateBytes
    buffers: float
    act_on: ActivationBytes  # activation checkpointing on
    act_off: ActivationBytes
    grad_accum: int
    seq_len: int
    checkpoint: float
    export: float
    data: str
    capacity: float | None
    full_logits: float = 0.0  # the LM head's activations without the chunked loss
    warnings: list[str] = field(default_factory=list)

    @property
    def auto(self) -> bool:
        return self.section.train.gradient_checkpointing == "auto"

    @property
    def checkpointing(self) -> bool | None:
        """As configured, or as auto decides it on this plan's memory; None: auto without a capacity
        (the workers decide on their own device's)."""
        if not self.auto:
            return bool(self.section.train.gradient_checkpointing)
        if self.capacity is None:
            return None
        return self.device_total(False) > self.capacity * AUTO_CHECKPOINTING_SHARE

    def device_total(self, checkpointing: bool) -> float:
        act = self.act_on if checkpointing else self.act_off
        return (self.states.on_device + self.buffers + act.total
                + (FRAMEWORK_GPU_BYTES if self.on_gpu else 0))


def _shape_of(model, config) -> ArchShape:
    import torch

    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return ArchShape(
        family="llama" if config.model_type in GATED else "bert",
        params=sum(p.numel() for p in model.parameters()), hidden=hidden, layers=config.num_hidden_layers,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=config.intermediate_size, vocab=config.vocab_size,
        layer_params=sum(p.numel() for p in blocks[0].parameters()),
        largest_param=max(p.numel() for p in model.parameters()))


def _vocab(cfg: RunConfig) -> int:
    arch = cfg.model.arch
    if arch is not None and arch.vocab_size:
        return arch.vocab_size
    tok = cfg.model.tokenizer or cfg.model.name_or_path
    if tok and any((Path(tok) / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        from dist_train.model.build import load_tokenizer

        return len(load_tokenizer(tok, cfg.model.trust_remote_code))
    if cfg.prepare is not None:
        return cfg.prepare.vocab_size  # the tokenizer `prepare` will train
    raise ConfigError("model.arch.vocab_size is null and the tokenizer is not built yet: set model.arch.vocab_size "
                      "for the plan")


def _hf_config(cfg: RunConfig, stage: str):
    """The HF config of the model this stage trains (from the inline arch or a local config.json)."""
    from transformers import AutoConfig

    from dist_train.model.build import arch_config

    source = cfg.model.name_or_path
    if stage == "finetune" and cfg.finetune.init_from not in (None, "pretrain"):
        source = cfg.finetune.init_from
    if source is None or (stage == "finetune" and cfg.finetune.init_from == "pretrain" and cfg.model.arch):
        if cfg.model.arch is None:
            raise ConfigError("set model.arch or model.name_or_path: the plan needs the architecture")
        return arch_config(cfg.model.arch, _vocab(cfg), None)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model's config.json at {source!r} ({str(e).splitlines()[0][:100]}): "
                          "the plan needs a local model directory (config.json alone is enough)") from None


def _lora_trainable(model, cfg: RunConfig, model_type: str) -> int:
    import torch

    from dist_train.model.build import lora_config

    targets = set(lora_config(cfg.finetune.lora, "CAUSAL_LM", model_type).target_modules)
    r = cfg.finetune.lora.r
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


@functools.lru_cache(maxsize=8)
def _meta_model(auto: str, config_json: str):
    """The module tree of an HF model on the meta device (shapes only), built once per config."""
    import json

    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        return getattr(transformers, auto).from_config(config)


def _build_meta(cfg: RunConfig, stage: str):
    config = _hf_config(cfg, stage)
    lm_head = stage == "pretrain" or cfg.finetune.task == "sft"
    if stage == "pretrain":
        auto = "AutoModelForCausalLM" if cfg.pretrain.objective == "clm" else "AutoModelForMaskedLM"
    else:
        auto = "AutoModelForCausalLM" if lm_head else "AutoModel"  # a task head is a rounding error
    model = _meta_model(auto, config.to_json_string())
    shape = _shape_of(model, config)
    trainable = shape.params
    if stage == "finetune" and cfg.finetune.lora.enabled:
        trainable = _lora_trainable(model, cfg, config.model_type)
    return shape, trainable, lm_head


def _data_line(cfg: RunConfig, stage: str, world: int) -> tuple[str, list[str]]:
    if stage != "pretrain":
        return "labeled records (finetune.data), split over the ranks each step", []
    d = cfg.pretrain.data
    lanes = d.lanes or world  # derive_stage has checked that world divides it
    warn: list[str] = []
    per_rank = f"{lanes / world:g} per rank"
    from dist_train.data.sources import is_url

    if not is_url(d.shards) and (Path(d.shards) / "manifest.json").is_file():
        from dist_train.data.manifest import read_manifest

        man = read_manifest(d.shards)
        n = len(man.train)
        if n < lanes:
            warn.append(f"{n} shards feed {lanes} lanes: {lanes - n} lanes would be empty; build more, smaller shards "
                        "(dist-train data build --samples-per-shard)")
        return f"{n} train shards, {lanes} lanes, {per_rank} ({n / lanes:.1f} shards per lane)", warn
    return f"{lanes} lanes, {per_rank}; shards not built yet ({d.shards})", warn


def plan_stage(cfg: RunConfig, stage: str, hw: Hardware) -> StagePlan:
    """Size one stage of `cfg` on `hw`; pure apart from reading the model's config and manifest."""
    sec = stage_section(cfg, stage)
    ds = sec.deepspeed
    on_gpu = hw.gpus_per_node is not None or cfg.ray.use_gpu
    world = hw.nodes * hw.gpus_per_node if hw.gpus_per_node else cfg.ray.num_workers
    configured = cfg.ray.num_workers
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_workers=world))  # as the run would be
    derived = derive_stage(cfg, stage, world_size=world)
    shape, trainable, lm_head = _build_meta(cfg, stage)
    seq_len = cfg.pretrain.data.seq_len if stage == "pretrain" else cfg.finetune.data.max_length
    precision = stage_precision(ds, on_gpu)[0]
    act_b = 2 if precision in ("bf16", "fp16") else 4
    mb = sec.train.micro_batch_size
    acts = {on: activation_bytes(shape, seq_len, mb, on, act_b, lm_head=lm_head, flash_attention=on_gpu,
                                 chunked_loss=sec.train.chunked_loss, head_trains=trainable == shape.params)
            for on in (True, False)}  # LoRA leaves the LM head frozen
    full_logits = activation_bytes(shape, seq_len, mb, True, act_b, lm_head=lm_head).lm_head
    states = model_state_bytes(shape.params, ds.zero_stage, world, precision, ds.offload_optimizer,
                               ds.offload_params, trainable=trainable)
    data, warnings = _data_line(cfg, stage, world)
    bucket = int(derived.deepspeed["zero_optimization"].get("reduce_bucket_size", shape.hidden**2))
    plan = StagePlan(
        stage=stage, section=sec, world=world, nodes=hw.nodes, on_gpu=on_gpu, shape=shape, trainable=trainable,
        states=states, buffers=zero_buffer_bytes(shape, ds.zero_stage, bucket, act_b), act_on=acts[True],
        act_off=acts[False], grad_accum=derived.grad_accum, seq_len=seq_len,
        checkpoint=checkpoint_bytes(shape.params, trainable, precision), export=shape.params * 4.0, data=data,
        capacity=hw.gpu_memory, full_logits=full_logits, warnings=warnings)
    if hw.gpus_per_node and world != configured:
        plan.warnings.append(f"the config has ray.num_workers={configured}: pass ray.num_workers={world} "
                             f"(and ray.use_gpu=true) to use all {world} GPUs")
    _fit_warnings(plan)
    return plan


def auto_checkpointing(cfg: RunConfig, stage: str, capacity: float) -> tuple[bool, float]:
    """gradient_checkpointing auto for one worker with `capacity` bytes: whether it turns on, and the
    bytes per worker the stage's plan needs without it."""
    plan = plan_stage(cfg, stage, Hardware(gpu_memory=capacity))
    need = plan.device_total(False)
    return need > capacity * AUTO_CHECKPOINTING_SHARE, need


def _fit_warnings(plan: StagePlan) -> None:
    if plan.capacity is None:
        return
    limit = plan.capacity * HEADROOM
    need = plan.device_total(bool(plan.checkpointing))
    if need <= limit:
        return
    fixes = []
    ds = plan.section.deepspeed
    if not plan.checkpointing and plan.device_total(True) <= limit:
        fixes.append(f"{plan.stage}.train.gradient_checkpointing=true")
    if plan.section.train.micro_batch_size > 1:
        fixes.append(f"a smaller {plan.stage}.train.micro_batch_size")
    if ds.zero_stage < 3:
        fixes.append(f"{plan.stage}.deepspeed.zero_stage=3")
    if not ds.offload_optimizer:
        fixes.append(f"{plan.stage}.deepspeed.offload_optimizer=true")
    plan.warnings.append(f"will not fit: {need / GiB:.1f} GiB per GPU needed, {limit / GiB:.1f} GiB usable "
                         f"({HEADROOM:.0%} of {plan.capacity / GiB:.0f}); try " + ", ".join(fixes or ["more GPUs"]))


def _b(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(plan: StagePlan) -> str:
    """The plan of one stage as the text `validate --plan` prints."""
    s, st, train, ds = plan.shape, plan.states, plan.section.train, plan.section.deepspeed
    big = max(plan.device_total(False), st.on_cpu, plan.checkpoint) >= GiB
    unit, div = ("GiB", GiB) if big else ("MiB", 2**20)
    per_node = plan.world // plan.nodes if plan.world % plan.nodes == 0 else plan.world / plan.nodes
    lines = [f"[{plan.stage}] plan for {plan.nodes} node(s) × {per_node} = {plan.world} ranks"
             + (f", {plan.capacity / GiB:.0f} GiB per GPU" if plan.capacity else ""),
             f"  model: {s.family}-style, {_b(s.params)} parameters ({_b(plan.trainable)} trained), {s.layers} layers, "
             f"hidden {s.hidden}, vocab {s.vocab}",
             f"  batch: global {train.global_batch_size} = micro {train.micro_batch_size} × {plan.world} ranks × "
             f"grad_accum {plan.grad_accum}; seq_len {plan.seq_len} -> {train.global_batch_size * plan.seq_len:,} "
             "tokens/step",
             f"    {'per rank, ' + unit:<34}{'GPU' if plan.on_gpu else 'device':>10}{'CPU':>10}"]

    def row(name: str, dev: float, cpu: float = 0.0, note: str = "") -> str:
        return f"    {name:<34}{dev / div:>10.2f}{cpu / div:>10.2f}{note}"

    off_w = st.weights if ds.offload_params else 0.0
    off_o = st.optimizer if ds.offload_optimizer else 0.0
    lines += [row("weights", st.weights - off_w, off_w), row("gradients", st.gradients),
              row("optimizer (fp32 master + Adam)", st.optimizer - off_o, off_o),
              row("DeepSpeed buffers", plan.buffers)]
    for on in (True, False):
        act = plan.act_on if on else plan.act_off
        mark = ("  <- auto picks this" if plan.auto else "  <- configured") if on == plan.checkpointing else ""
        lines.append(row(f"activations, checkpointing {'on' if on else 'off'}", act.total, note=mark))
    if plan.act_on.lm_head and plan.section.train.chunked_loss:
        head, full = plan.act_on.lm_head / div, plan.full_logits / div
        lines.append(f"      of which the LM head, chunked loss: {head:.2f} {unit} "
                     f"(full logits would take {full:.2f}: {full - head:.2f} saved)")
    elif plan.act_on.lm_head:
        lines.append(f"      of which the LM head's logits: {plan.act_on.lm_head / div:.2f} {unit} (train.chunked_loss "
                     "would save most of it)")
    if plan.on_gpu:
        lines.append(row("CUDA context, NCCL", FRAMEWORK_GPU_BYTES))
    for on in (True, False):
        total = plan.device_total(on)
        verdict = ""
        if plan.capacity:
            verdict = ("  fits" if total <= plan.capacity * HEADROOM else "  DOES NOT FIT") + \
                      f" ({total / plan.capacity:.0%} of the GPU)"
        lines.append(row(f"total, checkpointing {'on' if on else 'off'}", total, st.on_cpu, verdict))
    if plan.auto and plan.checkpointing is None:
        lines.append(f"  gradient checkpointing auto: each run decides on its workers' memory (off when the total "
                     f"without it is at most {AUTO_CHECKPOINTING_SHARE:.0%}); --gpu-memory shows the choice")
    if st.on_cpu:
        lines.append(f"  CPU memory per node for offload: {st.on_cpu * per_node / GiB:.1f} GiB")
    lines += [f"  checkpoint: {plan.checkpoint / div:.1f} {unit} per save (keep {train.keep_checkpoints}: "
              f"{plan.checkpoint * train.keep_checkpoints / div:.1f} {unit}); export {plan.export / div:.1f} {unit} "
              "(fp32 safetensors)",
              f"  data: {plan.data}"]
    lines += [f"  warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
