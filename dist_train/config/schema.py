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
    max_failures: int = doc("Restarts of a stage after a failure (a worker killed, a rank stuck, an error); "
                            "each resumes from the last committed checkpoint. An attempt that fails with the "
                            "same error at the same step as the one before is not restarted again. "
                            "-1: unlimited.", 3, ge=-1)
    collective_timeout_s: int = doc("A collective (all-reduce, barrier) that waits longer than this fails the "
                                    "worker group instead of hanging. Keep it above the longest stretch one "
                                    "rank works alone (export, checkpoint conversion).", 1800, ge=1)
    heartbeat_timeout_s: float = doc("A rank whose heartbeat (written every heartbeat_timeout_s/6 s by a "
                                     "thread of each worker) stops for this long is reported by name and the "
                                     "worker group fails (and restarts, with max_failures). Catches stopped, "
                                     "frozen and vanished ranks.", 120.0, gt=0)
    preemption_grace_s: float = doc("After SIGTERM, how long the driver waits for the workers to commit a "
                                    "checkpoint at the next step boundary before it exits anyway.", 120.0, gt=0)


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
    name_or_path: str | None = doc("Local model directory (or HF model id: dist-train runs offline unless "
                                   "HF_HUB_OFFLINE=0 is exported where a hub is reachable) to start from. "
                                   "Exactly one of name_or_path and arch.", None)
    arch: TinyArch | None = doc("Inline architecture for from-scratch training.", None)
    tokenizer: str | None = doc("Tokenizer id or directory; defaults to name_or_path.", None)
    trust_remote_code: bool = doc("Run Python code shipped inside a model directory (transformers' auto_map). "
                                  "Off: such a model is refused with a message.", False)
    dropout: float | None = doc("Override every dropout probability of the model (hidden, attention, "
                                "classifier); null keeps the model's own.", None, ge=0, le=1)
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = doc(
        "Attention kernel. auto: flash_attention_2 on a GPU where the flash_attn package is installed and the "
        "stage runs in bf16/fp16 (packed SFT rows then use its variable-length path), else sdpa (PyTorch's "
        "scaled_dot_product_attention; on CPU eager was slower at long sequences, docs/training.md). Exports "
        "do not keep it.", "auto")


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: int = doc("ZeRO stage: 0 (DDP), 1 (optimizer), 2 (+gradients), 3 (+parameters).", 2,
                          ge=0, le=3)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = doc(
        "Mixed-precision mode. auto: bf16 on GPUs and on CPUs with native bf16 kernels (AVX512-BF16 or AMX), fp32 "
        "on other CPUs, where bf16 matmuls are emulated and ran 8x slower on the quickstart (docs/training.md); a "
        "resumed run keeps its checkpoint's precision. The choice is said on the console.", "auto")
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
    gradient_checkpointing: Literal["auto", True, False] = doc(
        "Recompute activations in backward to save memory (about a third more compute). auto: off when the "
        "stage's plan (validate --plan) needs at most 75% of a worker's memory without it (a GPU's, or on CPU "
        "the host's share per worker), on otherwise; decided on the workers, printed and recorded in "
        "result.json.", "auto")
    chunked_loss: bool = doc("Causal/masked LM and sft: compute the loss through the LM head a chunk of "
                             "rows at a time, and only at positions with a target, so the full fp32 logits "
                             "(vocab × tokens) are never held; the same loss and gradients. false: HF's "
                             "full logits.", True)
    log_every: int = doc("Steps between metric lines.", 10,
                         ge=1)
    eval_every: int = doc("Steps between evaluations; 0 evaluates only at the end.", 50, ge=0)
    save_every: int = doc("Steps between checkpoints; 0 saves only at the end.", 50, ge=0)
    keep_checkpoints: int = doc("Newest committed checkpoints kept (the best one by best_metric is kept too).",
                                2, ge=1)
    best_metric: str | None = doc("Evaluation metric that ranks checkpoints: the best is kept beside the newest "
                                  "and named by checkpoints/best. pretrain: loss or perplexity; finetune: one "
                                  "its task reports (accuracy, macro_f1, f1, mse, pearson, loss...); auto: loss for "
                                  "pretrain, the task's main metric for finetune; null ranks none.", "auto")
    best_mode: Literal["auto", "min", "max"] = doc("Whether a smaller (min) or larger (max) best_metric is "
                                                   "better; auto: max for accuracy-like metrics, else min.",
                                                   "auto")
    early_stopping_patience: int = doc("Stop when best_metric has not improved for this many evaluations "
                                       "(0: never stop early). Every evaluation then saves a checkpoint.", 0, ge=0)
    early_stopping_min_delta: float = doc("Smallest change of best_metric that counts as an improvement.", 0.0,
                                          ge=0)
    export: Literal["last", "best"] = doc("Which checkpoint becomes <stage>/export: the last one, or the best by "
                                          "best_metric (the last when none was evaluated).", "last")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Precision of the exported weights; auto: bfloat16 for models over 1B parameters, else float32.", "auto")
    head_warmup_steps: int | None = doc("Train only the parameters the starting checkpoint lacks (a masked-LM or "
                                        "LM head missing from it, a new task head) for this many steps, then "
                                        "everything: the random head's first gradients then never reach the "
                                        "pretrained body. The learning-rate warmup starts over for the body when it "
                                        "joins. null: auto (pretrain: 10% of max_steps, at least 10 and at most "
                                        "200, when the checkpoint lacks a head; finetune: 0).", None, ge=0)
    head_lr: float | None = doc("Learning rate of the new parameters during the head warm-up (constant: nothing "
                                "else moves, so it can be high); null: 10 × optim.lr.", None, gt=0)
    nonfinite_patience: int = doc("Stop the run (a failure naming the last good checkpoint) when the loss, or "
                                  "outside fp16 the gradient norm, is NaN or infinite for this many consecutive "
                                  "steps; no checkpoint is saved from such a step. (fp16's own overflow steps, "
                                  "which it skips, do not count.) Each step's flag stays on the device until "
                                  "the next check (every log, eval and save step, and every few seconds between "
                                  "them), which all-reduces the flags since the last one: the run stops at the first "
                                  "check after the patience-th step in a row.", 3, ge=1)


@dataclass(frozen=True)
class MixSource:
    """A further corpus mixed into every lane, e.g. general-domain replay against forgetting."""

    shards: str = doc("Its shard source (as pretrain.data.shards), tokenized with the same tokenizer.", REQUIRED)
    name: str | None = doc("Its name in evaluations and reports; null: general when it is the only source, else "
                           "general_1, general_2, ...", None)
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
class EvalSet:
    """A named held-out set evaluated at every pretrain evaluation (and at step 0 for the baseline)."""

    name: str = doc("Its name in metrics, reports and plots (letters, digits, _ and -).", REQUIRED)
    path: str = doc("A shard directory built by `dist-train data build` (its validation split, or its training "
                    "split when it has none), or a .jsonl/.txt/.parquet/.csv corpus that the run packs with the "
                    "stage's tokenizer into OUTPUT_DIR/pretrain/eval_sets/<name>/ at start.", REQUIRED)
    role: Literal["domain", "general"] = doc("domain: text of the domain you adapt to (its loss should fall); "
                                             "general: text the model knew before (its rise is forgetting).",
                                             "domain")
    text_field: str = doc("The text field of a .jsonl/.parquet/.csv corpus.", "text")


@dataclass(frozen=True)
class LmEvalSection:
    """Standard benchmarks through EleutherAI's lm-evaluation-harness (pip install 'dist_train[eval]'),
    scored on rank 0 on Hugging Face directories: the starting model and the export. Causal LMs only."""

    tasks: tuple[str, ...] = doc("Harness task names (e.g. [hellaswag, arc_easy], or your own from include_path); "
                                 "empty: none.", ())
    include_path: str | None = doc("A directory of your own task YAMLs (e.g. multiple choice over local jsonl "
                                   "files), added to the harness's registry.", None)
    at: tuple[Literal["start", "end"], ...] = doc("Which models to score: start (the starting model, before any "
                                                  "update) and/or end (the stage's export).", ("start", "end"))
    limit: int | None = doc("Score only the first N examples of each task (a quick look; not comparable to "
                            "published figures).", None, ge=1)
    num_fewshot: int | None = doc("Few-shot examples per prompt; null: each task's default.", None, ge=0)
    batch_size: int = doc("Examples per forward pass.", 8, ge=1)


@dataclass(frozen=True)
class PretrainEval:
    """What continued pretraining is measured on: per-set loss and perplexity from step 0, and forgetting."""

    sets: tuple[EvalSet, ...] = doc("Held-out sets; empty: the main corpus's validation split (domain, named "
                                    "domain) and the validation split of every pretrain.data.mix source "
                                    "(general, named by its name).", ())
    samples: int = doc("Held-out samples evaluated per set (the first ones, the same at every evaluation and on "
                       "any worker count); 0: all.", 256, ge=0)
    baseline: bool | None = doc("Evaluate every set at step 0, before the first update, so each evaluation "
                                "compares with the starting model. null: on when model.name_or_path gives a "
                                "pretrained model.", None)
    max_forgetting: float | None = doc("Largest tolerated relative perplexity increase on the general sets "
                                       "(0.10: 10% above the baseline): warned about when exceeded, and the limit "
                                       "of best_metric=adapted_loss. null: no limit.", 0.10, gt=0)
    stop_on_forgetting: bool = doc("Stop the stage (with a checkpoint) at the first evaluation whose forgetting "
                                   "exceeds max_forgetting; with export=best and best_metric=adapted_loss the "
                                   "export is the best checkpoint within the limit.", False)
    lm_eval: LmEvalSection = doc("Standard benchmarks (lm-evaluation-harness) on the starting model and the export.",
                                 factory=LmEvalSection)


@dataclass(frozen=True)
class PretrainConfig:
    objective: Literal["clm", "mlm"] = doc("Continued-pretraining objective: causal LM (decoders) or masked LM "
                                           "(encoders, BERT's 80/10/10 dynamic masking).", "clm")
    mlm_probability: float = doc("Share of tokens chosen for prediction (mlm).", 0.15, gt=0, le=0.9)
    whole_word_masking: bool = doc("Choose whole words rather than sub-tokens (mlm).", False)
    data: PretrainData = doc("Token shards.", REQUIRED)
    eval: PretrainEval = doc("Evaluation sets, the step-0 baseline and forgetting.", factory=PretrainEval)
    deepspeed: DeepSpeedSection = doc("ZeRO and precision.", factory=DeepSpeedSection)
    optim: OptimConfig = doc("Optimizer and schedule.", factory=OptimConfig)
    train: TrainLoopConfig = doc("Steps, batch and cadence.", factory=TrainLoopConfig)


@dataclass(frozen=True)
class FinetuneData:
    train: str = doc("Labeled training data: a .jsonl, .csv or .parquet file (or glob), or a saved HF datasets "
                     "directory.", REQUIRED)
    validation: str | None = doc("Labeled validation data, evaluated every eval_every; null: split "
                                 "validation_fraction off train.", None)
    test: str | None = doc("Labeled test data, evaluated once on the exported model; null: split test_fraction "
                           "off train.", None)
    validation_fraction: float = doc("Share of train held out for validation when `validation` is null "
                                     "(a deterministic split by seed).", 0.0, ge=0, le=0.5)
    test_fraction: float = doc("Share of train held out for testing when `test` is null.", 0.0, ge=0, le=0.5)
    text_field: str = doc("Field holding the input text (sequence tasks).", "text")
    text_pair_field: str | None = doc("Field holding a second text, for pair tasks (entailment, similarity).",
                                      None)
    label_field: str = doc("Field holding the label: a class (string or int), a list of classes "
                           "(multi-label), or a number (regression).", "label")
    tokens_field: str = doc("Field holding the list of words (token_classification).", "tokens")
    tags_field: str = doc("Field holding one tag per word, BIO scheme (token_classification).", "tags")
    prompt_field: str = doc("Field holding the prompt (sft).", "prompt")
    response_field: str = doc("Field holding the response the model learns to produce (sft).", "response")
    max_length: int = doc("Truncate inputs to this many tokens.", 128, ge=8)
    group_by_length: bool = doc("Put examples of similar length in the same micro batch (shuffled within "
                                "windows of 50 global batches, the batches shuffled again), so batches pad "
                                "to their own longest example, not to a random one; false: plain shuffling.",
                                True)
    packing: bool = doc("sft: pack several examples into one row of max_length tokens (positions restart "
                        "and attention stays within each example: a block mask from position_ids), so no "
                        "position is padding. On a GPU with flash attention (model.attention) the rows take "
                        "its variable-length path, without a mask. Off by default: on CPU the block mask costs "
                        "more than the padding it saves (measured). Other tasks cannot pack.", False)


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = doc("Train low-rank adapters (peft LoRA) instead of all weights; the task head is "
                        "trained fully.", False)
    r: int = doc("Adapter rank.", 8, ge=1)
    alpha: float = doc("Scaling numerator: the adapter's update is scaled by alpha / r.", 16.0, gt=0)
    dropout: float = doc("Dropout on the adapter's input.", 0.05, ge=0, le=1)
    target_modules: tuple[str, ...] = doc("Module names to adapt, e.g. [q_proj, v_proj]; empty: peft's default "
                                          "for the architecture (attention projections).", ())
    export: Literal["merged", "adapter"] = doc("merged: fold the adapters into a plain HF model; adapter: save "
                                               "the adapter (and head) alone, for peft.", "merged")


@dataclass(frozen=True)
class FinetuneConfig:
    task: Literal["sequence_classification", "multi_label_classification", "regression", "token_classification",
                  "sft"] = doc("What to fine-tune for: a class per text (binary or multi-class), several "
                               "classes per text, a number per text, a tag per word, or a response per prompt "
                               "(causal LMs).", "sequence_classification")
    init_from: str | None = doc("Weights to start from: 'pretrain' (this run's pretrain export), an HF "
                                "directory, or null for model.name_or_path.", "pretrain")
    data: FinetuneData = doc("Labeled data.", REQUIRED)
    label_smoothing: float = doc("Label smoothing of the classification loss.", 0.0, ge=0, le=0.5)
    class_weights: Literal["none", "balanced"] = doc("balanced: weight each class's loss by n / (classes × "
                                                     "its count), against imbalance.", "none")
    lora: LoraSection = doc("Low-rank adapters.", factory=LoraSection)
    compare_base: bool = doc("Also fine-tune the unadapted model (model.name_or_path, or the same architecture "
                             "freshly initialised) with identical settings and seed, in OUTPUT_DIR/compare_base/, and "
                             "report the test-set difference with a paired bootstrap 95% interval: did adaptation "
                             "help? Needs test data.", False)
    quantize_int8: bool = doc("Also write export-int8/: a dynamically int8-quantized copy for CPU inference, "
                              "with its test-set metric delta in the report.", False)
    deepspeed: DeepSpeedSection = doc("ZeRO and precision.", factory=DeepSpeedSection)
    optim: OptimConfig = doc("Optimizer and schedule.",
                             factory=lambda: OptimConfig(lr=5.0e-5, weight_decay=0.01, warmup_steps=5))
    train: TrainLoopConfig = doc("Steps, batch and cadence.",
                                 factory=lambda: TrainLoopConfig(export="best",
                                                                 head_warmup_steps=0))


@dataclass(frozen=True)
class PrepareConfig:
    builtin: Literal["python_docs"] = doc("Embedded dataset to materialize (no network).", "python_docs")
    dir: str = doc("Where to write it; skipped when already complete.", "data/quickstart")
    tokenizer: str | None = doc("Tokenize with this tokenizer (e.g. a pretrained model's) instead of training a "
                                "BPE one on the corpus.", None)
    seq_len: int = doc("Sample length of the built shards.", 128, ge=8)
    vocab_size: int = doc("Size of the BPE tokenizer trained on the corpus.", 4096, ge=300)


@dataclass(frozen=True)
class SaveFault:
    step: int = doc("The checkpoint save of this step.", REQUIRED, ge=1)
    phase: Literal["start", "engine_saved", "staged", "renamed", "committed"] = doc(
        "Where in the save: start (nothing written), engine_saved (DeepSpeed files in .staging), staged "
        "(meta.json and checksums written), renamed (in place, `latest` not yet moved), committed.", "staged")
    rank: int = doc("Which rank acts.", 0, ge=0)
    action: Literal["kill", "ENOSPC", "EROFS", "EIO", "vanish"] = doc(
        "kill: SIGKILL the rank; ENOSPC/EROFS/EIO: the write fails with that OS error; vanish: the "
        "checkpoint directory disappears (an unmounted share).", "kill")


@dataclass(frozen=True)
class FaultsConfig:
    """Failures injected on purpose, for tests. Each fires once per run (a marker under
    OUTPUT_DIR/_faults/ remembers it across restarts). Refused unless DIST_TRAIN_ALLOW_FAULTS=1."""

    kill_at_steps: tuple[int, ...] = doc("SIGKILL `rank` right after these optimizer steps.", factory=tuple)
    stop_at_step: int | None = doc("SIGSTOP `rank` (frozen, not dead) right after this step.", None, ge=1)
    rank: int = doc("The rank kill_at_steps and stop_at_step act on.", 1, ge=0)
    save: tuple[SaveFault, ...] = doc("Faults inside the checkpoint save path.", factory=tuple)
    corrupt_checkpoint: int | None = doc("After committing the checkpoint of this step, flip one byte of one "
                                         "of its files (bit rot, a torn copy).", None, ge=1)

    def active(self) -> bool:
        return bool(self.kill_at_steps or self.stop_at_step or self.save or self.corrupt_checkpoint)


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides OUTPUT_DIR/<stage>/metrics.jsonl and TensorBoard (always written).
    Trackers are fed by the driver, so their credentials stay in the driver's environment."""

    trackers: tuple[Literal["mlflow", "wandb"], ...] = doc(
        "Experiment trackers to send metrics, the resolved config and the final report to: mlflow "
        "(pip install 'dist_train[mlflow]'; server from MLFLOW_TRACKING_URI) and/or wandb "
        "(pip install 'dist_train[wandb]'; key from WANDB_API_KEY or `wandb login`, or WANDB_MODE=offline). "
        "Credentials are read from the environment only, never from the config.", factory=tuple)
    project: str = doc("MLflow experiment / W&B project name.", "dist_train")
    run_name: str | None = doc("Tracker run name; null: the name of output_dir.", None)
    tags: dict[str, str] = doc("Extra tags for the tracker run (e.g. team: nlp).", factory=dict)
    console_every_s: float = doc("Non-interactive progress (data build, evaluation, export, in logs and "
                                 "Slurm output files): at most one line per this many seconds. Interactive "
                                 "terminals get live bars.", 30.0, gt=0)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = doc("Everything a run writes lives under here.", "runs/default")
    seed: int = doc("Seed for initialisation, data order and dropout.", 0, ge=0)
    prepare: PrepareConfig | None = doc("Build an embedded corpus and task before the run.", None)
    ray: RayConfig = doc("Workers and cluster.", factory=RayConfig)
    model: ModelConfig = doc("Model and tokenizer.", factory=ModelConfig)
    pretrain: PretrainConfig | None = doc("Stage 1: continued pretraining; omit to fine-tune only.", None)
    finetune: FinetuneConfig | None = doc("Stage 2: fine-tuning; omit to pretrain only.", None)
    logging: LoggingConfig = doc("Experiment trackers and console progress.", factory=LoggingConfig)
    faults: FaultsConfig = doc("Fault injection for tests (off).", factory=FaultsConfig)


STAGES = ("pretrain", "finetune")
PRETRAIN_METRICS = ("loss", "perplexity", "adapted_loss")  # what the pretrain evaluation reports
EVAL_COUNTS = ("tokens", "examples", "majority_rate")  # evaluation entries that are sizes or baselines: not on consoles
CONSOLE_HIDDEN = (*EVAL_COUNTS, "adapted_loss", "general_loss")  # in metrics.jsonl and reports, not on consoles


def headline(evaluation: dict[str, Any]) -> dict[str, float]:
    """An evaluation's figures for a console line: pooled ones only (per-set "<set>/loss" stay in the
    files and reports), no counts."""
    return {k: v for k, v in evaluation.items() if "/" not in k and k not in CONSOLE_HIDDEN
            and isinstance(v, (int, float)) and not isinstance(v, bool)}
HIGHER_IS_BETTER = ("accuracy", "f1", "macro_f1", "micro_f1", "exact_match", "precision", "recall", "pearson",
                    "tag_accuracy")


def stage_metrics(cfg: Any, stage: str) -> tuple[str, ...]:
    """The scalar metrics a stage's evaluation reports (the first is its main one)."""
    if stage == "pretrain":
        return PRETRAIN_METRICS
    from dist_train.tasks import task_class

    return task_class(cfg.finetune.task).metrics_names


def baseline_on(cfg: Any) -> bool:
    """pretrain.eval.baseline resolved: null means on for a pretrained starting model."""
    flag = cfg.pretrain.eval.baseline
    return cfg.model.name_or_path is not None if flag is None else flag


def measures_forgetting(cfg: Any) -> bool:
    """Whether the pretrain evaluation can tell forgetting: general sets, a baseline and a limit."""
    sec = cfg.pretrain
    general = any(s.role == "general" for s in sec.eval.sets) if sec.eval.sets else bool(sec.data.mix)
    return general and baseline_on(cfg) and sec.eval.max_forgetting is not None


def best_metric(cfg: Any, stage: str) -> str | None:
    """train.best_metric with "auto" resolved: pretrain ranks by adapted_loss (domain loss within the
    forgetting limit) when forgetting is measured, by loss otherwise; finetune by the task's main metric."""
    metric = getattr(cfg, stage).train.best_metric
    if metric != "auto":
        return metric
    if stage == "pretrain" and measures_forgetting(cfg):
        return "adapted_loss"
    return stage_metrics(cfg, stage)[0]


def higher_is_better(metric: str, mode: str = "auto") -> bool:
    """The direction of a best_metric: explicit mode, else by name (accuracy-like metrics grow)."""
    return mode == "max" or (mode == "auto" and metric in HIGHER_IS_BETTER)
