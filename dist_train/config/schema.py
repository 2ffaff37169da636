"""The typed config tree: every field a run reads, with its type, default, range and meaning.

The tree is plain frozen dataclasses. `loader.py` builds it strictly from YAML + overrides;
`derived.py` computes everything that follows from it. Field docs live in `metadata["doc"]`
so the configuration reference can be generated from this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def doc(text: str, default: Any = None, *, factory: Any = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a docstring and an optional numeric range (checked by the loader)."""
    meta = {"doc": text, "ge": ge, "gt": gt, "le": le}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED: Any = object()  # sentinel default: the loader reports the field as missing


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = doc("Training workers (one DeepSpeed rank each).", 2, ge=1)
    use_gpu: bool = doc("Give each worker one GPU. False runs on CPU with the gloo backend.", False)
    cpus_per_worker: int = doc("CPU cores reserved per worker; also its torch thread count.", 1, ge=1)
    address: str | None = doc("Ray cluster to join ('auto', 'ray://host:10001', host:port). "
                              "null starts a local Ray instance.", None)
    max_failures: int = doc("Worker-group restarts Ray Train may attempt after a failure.", 0, ge=-1)


@dataclass(frozen=True)
class TinyArch:
    """An inline model definition for from-scratch runs (no download)."""

    family: Literal["llama", "bert"] = doc("Architecture family.", "llama")
    hidden_size: int = doc("Width of the residual stream.", 128, ge=8)
    num_layers: int = doc("Transformer blocks.", 4, ge=1)
    num_heads: int = doc("Attention heads; must divide hidden_size.", 4, ge=1)
    intermediate_size: int = doc("MLP width.", 344, ge=8)
    max_position_embeddings: int = doc("Longest sequence the model accepts.", 512, ge=8)
    vocab_size: int | None = doc("Embedding rows; null takes the tokenizer's size.", None, ge=8)
    tie_word_embeddings: bool = doc("Share input and output embeddings.", True)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str | None = doc("HF model id or local directory to start from. "
                                   "Exactly one of name_or_path and arch.", None)
    arch: TinyArch | None = doc("Inline architecture for from-scratch training.", None)
    tokenizer: str | None = doc("Tokenizer id or directory; defaults to name_or_path.", None)
    dropout: float | None = doc("Override every dropout probability of the model (hidden, attention, "
                                "classifier); null keeps the model's own.", None, ge=0, le=1)


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: int = doc("ZeRO stage: 0 (DDP), 1 (optimizer), 2 (+gradients), 3 (+parameters).", 2,
                          ge=0, le=3)
    precision: Literal["bf16", "fp16", "fp32"] = doc("Mixed-precision mode.", "bf16")
    offload_optimizer: bool = doc("Keep optimizer states in CPU memory (ZeRO >= 1).", False)
    offload_params: bool = doc("Keep parameters in CPU memory (ZeRO-3 only).", False)
    config_file: str | None = doc("A DeepSpeed JSON of your own, merged into the rendered config: its keys "
                                  "add to ours, a key we also set must agree (or be \"auto\").", None)
    extra: dict[str, Any] = doc("Further DeepSpeed config keys written inline (as in its JSON), merged like "
                                "config_file, e.g. {zero_optimization: {stage3_max_live_parameters: 1e8}}.",
                                factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = doc("Peak learning rate.", 3.0e-4, gt=0)
    weight_decay: float = doc("Decoupled weight decay (AdamW).", 0.1, ge=0)
    beta1: float = doc("Adam beta1.", 0.9, ge=0, le=1)
    beta2: float = doc("Adam beta2.", 0.95, ge=0, le=1)
    eps: float = doc("Adam epsilon.", 1.0e-8, gt=0)
    warmup_steps: int = doc("Linear warmup steps from 0 to lr.", 10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = doc("Decay after warmup.", "cosine")
    min_lr_ratio: float = doc("Final lr as a fraction of lr (cosine).", 0.1, ge=0, le=1)
    grad_clip: float = doc("Clip the global gradient norm to this; 0 disables.", 1.0, ge=0)


@dataclass(frozen=True)
class TrainLoopConfig:
    max_steps: int = doc("Optimizer steps in this stage.", 100, ge=1)
    global_batch_size: int = doc("Samples per optimizer step over all workers. Fixed per run, so a "
                                 "resume on another worker count keeps the data plan.", 16, ge=1)
    micro_batch_size: int = doc("Samples per forward pass per worker.", 4, ge=1)
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    log_every: int = doc("Steps between metric lines (loss is read from the device only then).", 10,
                         ge=1)
    eval_every: int = doc("Steps between evaluations; 0 evaluates only at the end.", 50, ge=0)
    eval_batches: int = doc("Micro batches per worker per evaluation (pretrain); 0 = all.", 8, ge=0)
    save_every: int = doc("Steps between checkpoints; 0 saves only at the end.", 50, ge=0)
    keep_checkpoints: int = doc("Newest committed checkpoints kept (the best one by best_metric is kept too).",
                                2, ge=1)
    best_metric: str | None = doc("Evaluation metric that ranks checkpoints: the best is kept beside the newest "
                                  "and named by checkpoints/best. pretrain: loss or perplexity; finetune: "
                                  "accuracy or loss. null ranks none.", "loss")
    best_mode: Literal["auto", "min", "max"] = doc("Whether a smaller (min) or larger (max) best_metric is "
                                                   "better; auto: max for accuracy-like metrics, else min.",
                                                   "auto")


@dataclass(frozen=True)
class MixSource:
    """A further corpus mixed into every lane, e.g. general-domain replay against forgetting."""

    shards: str = doc("Its shard source (as pretrain.data.shards), tokenized with the same tokenizer.", REQUIRED)
    weight: float = doc("Its share of all samples (0-1); the main corpus gets what the mix leaves.", REQUIRED,
                        gt=0, le=1)


@dataclass(frozen=True)
class PretrainData:
    shards: str = doc("Where the shards built by `dist-train data build` are: a directory, or an fsspec URL "
                      "(s3://, gs://, https://) holding manifest.json, optionally ending in a brace pattern of "
                      "shard names (shard-{000000..000099}.tar); or 'pipe:CMD {file}' when allow_pipe.", REQUIRED)
    allow_pipe: bool = doc("Allow a pipe: source, which runs a shell command per shard.", False)
    mix: tuple[MixSource, ...] = doc("Further corpora and their shares, mixed deterministically into every "
                                     "lane: [{shards: general/, weight: 0.1}].", ())
    seq_len: int = doc("Tokens per sample; must equal the manifest's seq_len.", 128, ge=8)
    lanes: int | None = doc("Parallel shard streams. Each worker reads lanes / num_workers of them, so a run "
                            "can resume on any worker count that divides lanes; null = num_workers.", None, ge=1)
    window_shards: int = doc("Shuffle window: samples are permuted within groups of this many consecutive "
                             "shards of a lane (memory: this many shards per lane).", 1, ge=1)
    loader_workers: int = doc("DataLoader processes per worker reading windows ahead; 0 reads in a thread.", 0,
                              ge=0)
    on_bad_sample: Literal["error", "skip"] = doc("A corrupt shard or sample: stop naming it (error), or replace "
                                                  "it by another sample of its window and count it (skip).",
                                                  "error")
    verify_checksums: bool = doc("Check each shard's sha256 against the manifest while it streams.", True)


@dataclass(frozen=True)
class PretrainConfig:
    objective: Literal["clm", "mlm"] = doc("Continued-pretraining objective: causal LM (decoders) or masked LM "
                                           "(encoders, BERT's 80/10/10 dynamic masking).", "clm")
    mlm_probability: float = doc("Share of tokens chosen for prediction (mlm).", 0.15, gt=0, le=0.9)
    whole_word_masking: bool = doc("Choose whole words rather than sub-tokens (mlm).", False)
    data: PretrainData = doc("Token shards.", REQUIRED)
    deepspeed: DeepSpeedSection = doc("ZeRO and precision.", factory=DeepSpeedSection)
    optim: OptimConfig = doc("Optimizer and schedule.", factory=OptimConfig)
    train: TrainLoopConfig = doc("Steps, batch and cadence.", factory=TrainLoopConfig)


@dataclass(frozen=True)
class FinetuneData:
    train: str = doc("Labeled training file (jsonl).", REQUIRED)
    validation: str | None = doc("Labeled validation file (jsonl), evaluated every eval_every.", None)
    test: str | None = doc("Labeled test file (jsonl), evaluated once at the end.", None)
    text_field: str = doc("Field holding the input text.", "text")
    label_field: str = doc("Field holding the class label (string or int).", "label")
    max_length: int = doc("Truncate inputs to this many tokens.", 128, ge=8)


@dataclass(frozen=True)
class FinetuneConfig:
    task: Literal["sequence_classification"] = doc("Task head to add.", "sequence_classification")
    init_from: str | None = doc("Weights to start from: 'pretrain' (this run's pretrain export), an HF "
                                "directory, or null for model.name_or_path.", "pretrain")
    data: FinetuneData = doc("Labeled data.", REQUIRED)
    deepspeed: DeepSpeedSection = doc("ZeRO and precision.", factory=DeepSpeedSection)
    optim: OptimConfig = doc("Optimizer and schedule.",
                             factory=lambda: OptimConfig(lr=5.0e-5, weight_decay=0.01, warmup_steps=5))
    train: TrainLoopConfig = doc("Steps, batch and cadence.",
                                 factory=lambda: TrainLoopConfig(gradient_checkpointing=True, best_metric="accuracy"))


@dataclass(frozen=True)
class PrepareConfig:
    builtin: Literal["python_docs"] = doc("Embedded dataset to materialize (no network).", "python_docs")
    dir: str = doc("Where to write it; skipped when already complete.", "data/quickstart")
    tokenizer: str | None = doc("Tokenize with this tokenizer (e.g. a pretrained model's) instead of training a "
                                "BPE one on the corpus.", None)
    seq_len: int = doc("Sample length of the built shards.", 128, ge=8)
    vocab_size: int = doc("Size of the BPE tokenizer trained on the corpus.", 4096, ge=300)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = doc("Everything a run writes lives under here.", "runs/default")
    seed: int = doc("Seed for initialisation, data order and dropout.", 0, ge=0)
    prepare: PrepareConfig | None = doc("Build an embedded corpus and task before the run.", None)
    ray: RayConfig = doc("Workers and cluster.", factory=RayConfig)
    model: ModelConfig = doc("Model and tokenizer.", factory=ModelConfig)
    pretrain: PretrainConfig | None = doc("Stage 1: continued pretraining; omit to fine-tune only.", None)
    finetune: FinetuneConfig | None = doc("Stage 2: fine-tuning; omit to pretrain only.", None)


STAGES = ("pretrain", "finetune")
# What each stage's evaluation reports, i.e. what train.best_metric may name.
EVAL_METRICS = {"pretrain": ("loss", "perplexity"), "finetune": ("accuracy", "loss")}
HIGHER_IS_BETTER = ("accuracy", "f1", "macro_f1", "precision", "recall", "pearson")


def higher_is_better(metric: str, mode: str = "auto") -> bool:
    """The direction of a best_metric: explicit mode, else by name (accuracy-like metrics grow)."""
    return mode == "max" or (mode == "auto" and metric in HIGHER_IS_BETTER)
