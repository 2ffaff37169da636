"""Build Hugging Face models and tokenizers from the config. Knows nothing of distribution.

`build_*` functions take plain arguments and return plain `nn.Module`s; DeepSpeed wraps them
later in train/engine.py, the one seam.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_train.config.schema import TinyArch


class ModelError(ValueError):
    """A model or tokenizer that cannot be used as configured, named with the fix."""


def _offline() -> None:
    # No model hub is reachable on clusters behind firewalls (or here): fail fast instead of
    # retrying downloads. Users who want the hub can export HF_HUB_OFFLINE=0.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def check_remote_code(name_or_path: str | None, trusted: bool) -> None:
    """Refuse a local model or tokenizer directory that ships Python code (an `auto_map`) unless
    the config trusts it: loading it would run that code on every worker."""
    if not name_or_path or trusted:
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(name_or_path) / name
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
        except (OSError, ValueError):
            continue
        if auto_map:
            raise ModelError(f"{name_or_path!r} ships its own Python code ({name} has an auto_map), which is not run "
                             "by default: set model.trust_remote_code=true only if you trust that code")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer by local path or cached hub id; guarantees a pad token is defined."""
    _offline()
    from transformers import AutoTokenizer

    check_remote_code(name_or_path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer {name_or_path!r} ({str(e).splitlines()[0][:120]}): "
                         "give a local tokenizer directory or a model id in the local HF cache") from None
    if tok.pad_token is None:
        # Padding is masked out of every loss; any existing special token will do.
        tok.pad_token = tok.eos_token or tok.sep_token or tok.unk_token
    return tok


def arch_config(arch: TinyArch, vocab_size: int, pad_token_id: int | None,
                eos_token_id: int | None = None) -> Any:
    """An HF config for an inline architecture (random init, for from-scratch runs)."""
    from transformers import BertConfig, LlamaConfig

    if arch.hidden_size % arch.num_heads:
        raise ModelError(f"model.arch.hidden_size={arch.hidden_size} is not divisible by "
                         f"num_heads={arch.num_heads}: pick sizes that divide")
    vocab = arch.vocab_size or vocab_size
    if arch.family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=arch.hidden_size,
                           num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                           num_key_value_heads=arch.num_heads, intermediate_size=arch.intermediate_size,
                           max_position_embeddings=arch.max_position_embeddings,
                           tie_word_embeddings=arch.tie_word_embeddings, pad_token_id=pad_token_id,
                           bos_token_id=None, eos_token_id=eos_token_id, attn_implementation="sdpa")
    return BertConfig(vocab_size=vocab, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                      num_attention_heads=arch.num_heads, intermediate_size=arch.intermediate_size,
                      max_position_embeddings=arch.max_position_embeddings, pad_token_id=pad_token_id or 0,
                      tie_word_embeddings=arch.tie_word_embeddings)


def model_vocab_size(name_or_path: str | None, arch: TinyArch | None, tokenizer_size: int) -> int:
    """Embedding rows the model will have (reads only the config, not the weights)."""
    if arch is not None:
        return arch.vocab_size or tokenizer_size
    return int(model_config_value(name_or_path, "vocab_size"))


def model_config_value(name_or_path: str | None, key: str) -> Any:
    """One value of a pretrained model's HF config (reads only config.json, not the weights)."""
    _offline()
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(name_or_path), key)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"cannot read model config {name_or_path!r} ({str(e).splitlines()[0][:120]}): "
                         "give a local HF model directory") from None


def with_dropout(config: Any, dropout: float | None) -> Any:
    """The config with every float `*dropout*` setting set to `dropout` (None: unchanged)."""
    if dropout is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, dropout)
    return config


def _pretrained_config(name_or_path: str, dropout: float | None, trust_remote_code: bool = False,
                       **overrides: Any) -> Any:
    from transformers import AutoConfig

    check_remote_code(name_or_path, trust_remote_code)
    return with_dropout(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **overrides),
                        dropout)


@dataclass(frozen=True)
class LoadReport:
    """What loading pretrained weights found: parameters the checkpoint lacked (so they start random:
    a masked-LM head missing from an encoder checkpoint, a new task head) and tensors of the checkpoint
    the model does not use (e.g. BERT's pooler under a masked-LM head)."""

    source: str | None = None
    new: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    def new_line(self, stage: str) -> str | None:
        """The one line that names the randomly initialised parameters, or None."""
        if not self.new:
            return None
        names = ", ".join(self.new[:6]) + (f", … ({len(self.new)} in all)" if len(self.new) > 6 else "")
        return f"[{stage}] not in {self.source}, so initialised at random: {names}"


def _load_report(source: str, info: dict[str, Any]) -> LoadReport:
    return LoadReport(source=source, new=tuple(sorted(info.get("missing_keys") or ())),
                      unused=tuple(sorted(info.get("unexpected_keys") or ())))


def build_lm(*, objective: str, name_or_path: str | None, arch: TinyArch | None, vocab_size: int,
             pad_token_id: int | None, eos_token_id: int | None, seed: int,
             gradient_checkpointing: bool, dropout: float | None = None,
             trust_remote_code: bool = False, attention: str = "sdpa") -> tuple[torch.nn.Module, LoadReport]:
    """A causal ('clm') or masked ('mlm') LM: pretrained weights from name_or_path, or random
    init (seeded, identical on every rank) from arch; and what loading the weights found.
    `attention`: the attn_implementation (model/attention.py chooses it)."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM
    torch.manual_seed(seed)
    report = LoadReport()
    try:
        if arch is not None:
            config = with_dropout(arch_config(arch, vocab_size, pad_token_id, eos_token_id), dropout)
            model = auto.from_config(config, attn_implementation=kernel_for(auto, config, attention))
        else:
            config = _pretrained_config(name_or_path, dropout, trust_remote_code)
            model, info = auto.from_pretrained(name_or_path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                               config=config, output_loading_info=True,
                                               attn_implementation=kernel_for(auto, config, attention))
            report = _load_report(name_or_path, info)
    except ValueError as e:  # e.g. a BERT model asked for a causal LM
        raise ModelError(f"the model cannot do pretrain.objective={objective} ({str(e).splitlines()[0][:100]}): "
                         f"use {'mlm' if objective == 'clm' else 'clm'} for this architecture") from None
    return _finish(model, gradient_checkpointing), report


def build_task_model(auto_class: str, *, init_from: str | None, model_kwargs: dict[str, Any],
                     pad_token_id: int | None, seed: int, gradient_checkpointing: bool, dropout: float | None = None,
                     lora: Any = None, peft_task_type: str = "SEQ_CLS", trust_remote_code: bool = False,
                     arch: TinyArch | None = None, vocab_size: int = 0,
                     eos_token_id: int | None = None, attention: str = "sdpa") -> tuple[torch.nn.Module, LoadReport]:
    """A fine-tuning model from an HF directory (weights only): `auto_class` (e.g.
    AutoModelForSequenceClassification) with a fresh seeded head, optionally wrapped in LoRA
    adapters (`lora`: a LoraSection) with the head trained fully; and what loading found. With
    init_from None, the inline `arch` freshly initialised (seeded): the unadapted baseline of a
    from-scratch run."""
    _offline()
    import transformers

    torch.manual_seed(seed)
    auto = getattr(transformers, auto_class)
    report = LoadReport()
    if init_from is None:
        if arch is None:
            raise ModelError("nothing to fine-tune from: set finetune.init_from or model.name_or_path")
        config = with_dropout(arch_config(arch, vocab_size, pad_token_id, eos_token_id), dropout)
        for key, value in model_kwargs.items():
            setattr(config, key, value)
        check_model_fits(auto_class, config, f"model.arch ({arch.family})")
        model = auto.from_config(config, attn_implementation=kernel_for(auto, config, attention))
    else:
        config = _pretrained_config(init_from, dropout, trust_remote_code, **model_kwargs)
        check_model_fits(auto_class, config, init_from)
        model, info = auto.from_pretrained(init_from, config=config, dtype=torch.float32,
                                           trust_remote_code=trust_remote_code, output_loading_info=True,
                                           attn_implementation=kernel_for(auto, config, attention))
        report = _load_report(init_from, info)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if lora is not None:
        model = with_lora(model, lora, peft_task_type)
    return _finish(model, gradient_checkpointing), report


def kernel_for(auto: Any, config: Any, attention: str) -> str:
    """`attention`, or sdpa where flash attention was chosen for a model class transformers has no flash
    kernel for (the model's own attention_implementation then says so)."""
    cls = auto._model_mapping.get(type(config), None) if hasattr(auto, "_model_mapping") else None
    if attention == "flash_attention_2" and not getattr(cls, "_supports_flash_attn", False):
        return "sdpa"
    return attention


def check_model_fits(auto_class: str, config: Any, name: str) -> None:
    """A ModelError when the architecture has no head of this kind (e.g. SFT on an encoder)."""
    import transformers

    mapping = getattr(transformers, auto_class)._model_mapping
    if type(config) not in mapping:
        raise ModelError(f"{name!r} ({config.model_type}) has no {auto_class[len('AutoModelFor'):]} head: pick a "
                         "task this architecture supports (sft needs a decoder such as Llama/GPT/Qwen)")


def lora_config(lora: Any, peft_task_type: str, model_type: str) -> Any:
    """peft's LoraConfig for a LoraSection; empty target_modules take peft's default for the
    architecture (its attention projections)."""
    from peft import LoraConfig, TaskType

    targets = list(lora.target_modules) or None
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            raise ModelError(f"peft has no default LoRA targets for {model_type!r}: set finetune.lora.target_modules "
                             "(e.g. [q_proj, v_proj])")
        targets = list(DEFAULTS[model_type])
    return LoraConfig(task_type=getattr(TaskType, peft_task_type), r=lora.r, lora_alpha=lora.alpha,
                      lora_dropout=lora.dropout, target_modules=targets)


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """A ModelError naming a target module that matches no module of the model, with examples."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ModelError(f"finetune.lora.target_modules: {unknown[0]!r} is not a linear layer of this model: use "
                         f"some of {sorted(names)[:12]}")


HEAD_MODULES = ("classifier", "score")  # task heads of HF sequence/token classifiers: trained fully under LoRA


def with_lora(model: torch.nn.Module, lora: Any, peft_task_type: str) -> torch.nn.Module:
    """The model with LoRA adapters on the target modules; the task head (if any) stays trainable
    in place. The adapter config keeps the peft task type for the record (and the adapter export);
    the model is wrapped without peft's head copies, which would duplicate ZeRO-3's partitioned
    parameters."""
    import copy

    from peft import get_peft_model

    cfg = lora_config(lora, peft_task_type, model.config.model_type)
    check_lora_targets(model, list(cfg.target_modules))
    plain = copy.deepcopy(cfg)
    plain.task_type = None
    peft_model = get_peft_model(model, plain)
    for name, p in peft_model.named_parameters():
        if any(f".{head}." in f".{name}" for head in HEAD_MODULES):
            p.requires_grad = True
    return peft_model


def _finish(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and ZeRO's parameter hooks.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Training never decodes: a KV cache is pure overhead, and with one transformers ignores the
    # position ids that keep packed examples apart. The export turns it back on.
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def new_parameters(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The trainable parameters a LoadReport names as new (a tied alias counts once), also once the
    model is wrapped (peft's LoRA puts `base_model.model.` before every name)."""
    wanted = set(names)
    found = {id(p): p for n, p in model.named_parameters(remove_duplicate=False)
             if p.requires_grad and (n in wanted or any(n.endswith("." + k) for k in wanted))}
    return list(found.values())


def param_groups(model: torch.nn.Module, weight_decay: float,
                 head: list[torch.nn.Parameter] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norms and embeddings-free 1-D tensors. With `head` (the
    parameters a head warm-up trains first) those come first, in groups of their own, and the
    others' groups are marked `body`, so their learning rate can be held at 0 and ramped later."""
    head_ids = {id(p) for p in head or ()}
    groups = []
    for is_head in ((True, False) if head_ids else (False,)):
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad and (id(p) in head_ids) == is_head:
                # a parameter partitioned by ZeRO-3 is an empty 1-D placeholder: its shape is ds_shape
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        extra = {"body": not is_head} if head_ids else {}
        groups += [{"params": decay, "weight_decay": weight_decay, **extra},
                   {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]] if head_ids else groups


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of a model, counted as what its matmuls compute (forward + backward).

    Every Linear weight costs 6 FLOPs per token it is applied to when it trains (forward 2, input
    gradient 2, weight gradient 2) and 4 when it is frozen (LoRA's base weights: no weight gradient);
    embedding lookups cost nothing. `per_token`: the Linears of the body and of a task head, applied
    to every token; `head`: the LM head (tied or not), applied to every token, or only to the tokens
    with a target when the chunked loss skips the rest. `per_attention`: 12·L·H per (query, key) pair,
    counted over each sequence's real length and without halving for causal masks (PaLM's
    convention; H is heads × head_dim, which some models set apart from the hidden size). A mixture of
    experts counts the top-k share of its expert weights. Recomputation by activation checkpointing is
    not counted: this is MFU, not HFU.
    """

    per_token: float
    per_attention: float
    head: float = 0.0

    def of(self, tokens: int, attention_units: int, head_tokens: int | None = None) -> float:
        """FLOPs of a batch of `tokens` real tokens whose sequences' squared lengths sum to
        `attention_units`, with the LM head applied to `head_tokens` of them (None: all)."""
        return (self.per_token * tokens + self.per_attention * attention_units
                + self.head * (tokens if head_tokens is None else head_tokens))

    def per_token_at(self, seq_len: int) -> float:
        """FLOPs per token when every sequence is `seq_len` long and the head sees every token."""
        return self.per_token + self.head + self.per_attention * seq_len


def flops_model(model: torch.nn.Module) -> FlopsModel:
    """The FlopsModel of `model` (partitioned ZeRO-3 parameters count at their full size)."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if get is not None else None
    config = model.config
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    body = head = 0.0
    for module in model.modules():
        # transformers' Conv1D (GPT-2) is a Linear with its weight transposed
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            cost = (6.0 if module.weight.requires_grad else 4.0) * _numel(module.weight)
            if module is output:
                head += cost
            else:
                body += cost
        elif isinstance(getattr(module, "num_experts", None), int):
            # a mixture of experts stored as 3-D weights (transformers 5's Mixtral, Qwen-MoE): each token
            # passes through top-k of the experts, so it costs that share of their weights; the router's
            # 2-D weight (applied with F.linear, not a Linear) is applied to every token
            share = getattr(cfg, "num_experts_per_tok", 1) / module.num_experts
            body += sum((6.0 if p.requires_grad else 4.0) * _numel(p) * (share if _ndim(p) == 3 else 1.0)
                        for p in module.parameters(recurse=False) if _ndim(p) in (2, 3))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return FlopsModel(body, 12.0 * cfg.num_hidden_layers * heads * head_dim, head)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token at sequences of `seq_len` tokens (see FlopsModel)."""
    return flops_model(model).per_token_at(seq_len)


def _ndim(p: torch.Tensor) -> int:
    return len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 placeholder is 1-D; ds_shape is the real shape


def _numel(p: torch.Tensor) -> int:
    # A parameter partitioned by ZeRO-3 is an empty placeholder that keeps its full size in ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))
