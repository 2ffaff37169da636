"""Export a checkpoint as a plain Hugging Face directory (safetensors + config + tokenizer).

Every checkpoint carries `hf/` (the model's config and tokenizer), so a checkpoint alone can be
exported, from any ZeRO stage, by one process without DeepSpeed engines: the weights are the
fp32 master copies, consolidated shard by shard (DeepSpeed's lazy mode: the optimizer's moments
are never materialised). The directory appears atomically: written beside it, then renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dist_train import owned
from dist_train.checkpoint.safe_load import weights_only_loading
from dist_train.deepspeed_import import import_deepspeed
from dist_train.progress import Progress

HF_DIR = "hf"
EXPORT_KIND = "export"


def describe_model(module: torch.nn.Module, tokenizer: Any, ckpt_dir: Path, task: dict | None = None) -> None:
    """Write into a checkpoint being staged what it takes to rebuild the model without the run: the
    HF config (with its class), the tokenizer, the LoRA adapter config (when adapters are trained)
    and the fine-tuning task (labels and fields, for `predict`)."""
    import copy

    hf = ckpt_dir / HF_DIR
    base = module
    if hasattr(module, "peft_config"):  # a peft model: describe the base model and the adapter apart
        base = module.get_base_model()
        module.peft_config["default"].save_pretrained(str(hf))
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.dtype = torch.float32
    if hasattr(config, "use_cache"):  # off in training (packed rows, checkpointing); generation wants it
        config.use_cache = True
    config.save_pretrained(str(hf))
    tokenizer.save_pretrained(str(hf))
    if task is not None:
        from dist_train.tasks import TASK_FILE

        (hf / TASK_FILE).write_text(json.dumps(task, indent=1))


def checkpoint_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from one committed checkpoint directory."""
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    zero = meta["config"][meta["stage"]]["deepspeed"]["zero_stage"]
    if zero == 0:  # no ZeRO partitions: the module's own weights (the working precision)
        model_file = next(ckpt_dir.glob("mp_rank_00_model_states.pt"))
        with weights_only_loading():
            states = torch.load(model_file, map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It narrates every shard it reads, with progress bars: keep the console for our own lines.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loading():
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
        return {name: t.contiguous() for name, t in lazy.items()}  # one parameter at a time


ADAPTER_CONFIG = "adapter_config.json"


def _with_task_head(model: Any, model_cls: Any, config: Any, hf: Path) -> Any:
    """A peft model of the fine-tune's task type (whose head peft saves with the adapter), holding
    the weights of `model` (trained with the head in place, see model/build.py's with_lora)."""
    import warnings

    from peft import PeftConfig, get_peft_model

    from dist_train.model.build import HEAD_MODULES
    from dist_train.tasks import TASK_FILE

    task_type = json.loads((hf / TASK_FILE).read_text()).get("peft_task_type") if (hf / TASK_FILE).is_file() else None
    if task_type in (None, "CAUSAL_LM"):
        return model
    cfg = PeftConfig.from_pretrained(str(hf))
    cfg.task_type = task_type
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        typed = get_peft_model(model_cls(config), cfg)
    state = {}
    for key, value in model.state_dict().items():
        head = next((h for h in HEAD_MODULES if f".{h}." in f".{key}"), None)
        if head is None:
            state[key] = value
        else:  # peft keeps the trained head copy and the original side by side
            for slot in ("modules_to_save.default", "original_module"):
                state[key.replace(f"{head}.", f"{head}.{slot}.", 1)] = value
    typed.load_state_dict(state, strict=False, assign=True)
    return typed


EXPORT_PHASES = 3  # weights read, model saved, tokenizer saved: the units of an export's progress
CARRIED_FILE = "model-carried.safetensors"  # a sharded export's extra shard of carried weights


def source_tensors(source: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of the safetensors checkpoint in directory `source` (those it holds)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in set(keys) & set(f.keys()):
                found[key] = f.get_tensor(key).float().contiguous()
    return found


def carry_weights(export: Path, source: str, keys: tuple[str, ...], prefix: str) -> list[str]:
    """Add to a saved export the weights of the starting checkpoint that the trained model did not use
    (BERT's pooler under a masked-LM head), so a fine-tune from the export starts with them as a
    fine-tune from the original model would. A headless checkpoint's names get the export's base-model
    prefix. Returns the names written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = source_tensors(source, keys)
    if not tensors:
        return []
    single, index = export / "model.safetensors", export / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            present = set(f.keys())
    else:
        present = set(json.loads(index.read_text())["weight_map"])
    prefixed = prefix and any(k.startswith(prefix + ".") for k in present)
    headless = prefix and not any(k.startswith(prefix + ".") for k in tensors)
    carried = {(f"{prefix}.{k}" if prefixed and headless else k): v for k, v in tensors.items()}
    carried = {k: v for k, v in carried.items() if k not in present}
    if single.is_file() and carried:
        save_file({**load_file(str(single)), **carried}, str(single), metadata={"format": "pt"})
    elif carried:
        save_file(carried, str(export / CARRIED_FILE), metadata={"format": "pt"})
        meta = json.loads(index.read_text())
        meta["weight_map"].update(dict.fromkeys(carried, CARRIED_FILE))
        index.write_text(json.dumps(meta, indent=2))
    return sorted(carried)


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_BF16_ABOVE = 1_000_000_000  # export_dtype auto: bfloat16 for models with more parameters than this


def export_dtype(name: str, parameters: int) -> torch.dtype:
    """The dtype an export's weights are saved in; `auto`: bfloat16 above 1B parameters, else float32."""
    if name == "auto":
        return torch.bfloat16 if parameters > AUTO_BF16_ABOVE else torch.float32
    return EXPORT_DTYPES[name]


def trained_limits(meta: dict[str, Any]) -> tuple[int | None, str]:
    """(max length, truncation side) the stage of a checkpoint's meta.json trained with: what a plain
    `tokenizer(text, truncation=True)` on its export should do. SFT kept a prompt's end (left)."""
    stage = meta.get("stage")
    section = (meta.get("config") or {}).get(stage) or {}
    data = section.get("data") or {}
    length = data.get("seq_len") if stage == "pretrain" else data.get("max_length")
    side = "left" if stage == "finetune" and section.get("task") == "sft" else "right"
    return (length if isinstance(length, int) else None), side


def export_checkpoint(ckpt_dir: Path, out_dir: Path, adapter_only: bool = False,
                      progress: Progress | None = None,
                      carry: tuple[str | None, tuple[str, ...]] | None = None,
                      legacy: owned.Proof | None = None, dtype: str = "auto") -> Path:
    """Write `out_dir` from a committed checkpoint directory; returns it. A LoRA checkpoint is
    exported with its adapters merged into a plain HF model, or (`adapter_only`) as a peft adapter
    directory (adapter and task head weights) for the base model it names. `carry`: (starting
    checkpoint, names) of weights it held that the model did not use, added to the export
    (carry_weights). `progress` counts EXPORT_PHASES. `dtype`: float32, bfloat16, float16 or auto
    (export_dtype). The tokenizer truncates to the stage's max length, on the side it trained with;
    README.md is the model card (checkpoint/card.py); every file is readable as the umask allows.

    `out_dir` may be new, empty or an earlier export (`legacy`: an older version's, by its place);
    anything else, or a path overlapping the checkpoint, raises OwnershipError before any work."""
    import transformers

    progress = progress or Progress("export", enabled=False)
    owned.check_output(out_dir, EXPORT_KIND, inputs=[ckpt_dir], legacy=legacy, what="the export directory")

    hf = ckpt_dir / HF_DIR
    if not (hf / "config.json").is_file():
        raise ValueError(f"{ckpt_dir} is not a committed dist-train checkpoint (no {HF_DIR}/config.json): "
                         "point at <output_dir>/<stage>/checkpoints/step_N")
    config = transformers.AutoConfig.from_pretrained(str(hf))
    model_cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):  # no memory for random weights that are overwritten anyway
        model = model_cls(config)
        if (hf / ADAPTER_CONFIG).is_file():
            import warnings

            from peft import PeftConfig, get_peft_model

            with warnings.catch_warnings():  # peft notes it would record this dir as the base: we restore it
                warnings.simplefilter("ignore")
                model = get_peft_model(model, PeftConfig.from_pretrained(str(hf)))
    model.load_state_dict(checkpoint_state_dict(ckpt_dir), strict=False, assign=True)
    model.tie_weights()
    progress.update()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{ckpt_dir} lacks weights for {missing[:3]}: the checkpoint is incomplete")
    broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise ValueError(f"{ckpt_dir} holds NaN or infinite weights ({', '.join(broken[:3])}"
                         f"{', ...' if len(broken) > 3 else ''}): it cannot be exported; export an earlier checkpoint")
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    tmp = owned.temp_beside(out_dir)
    try:
        if hasattr(model, "peft_config") and not adapter_only:
            model = model.merge_and_unload()  # W + (alpha/r)·B·A folded in: a plain model
        elif hasattr(model, "peft_config"):
            model = _with_task_head(model, model_cls, config, hf)
        if not hasattr(model, "peft_config"):  # an adapter keeps the dtype it trained in
            model = model.to(export_dtype(dtype, sum(p.numel() for p in model.parameters())))
            if any(not torch.isfinite(p).all() for p in model.parameters()):
                raise ValueError(f"{ckpt_dir}'s weights overflow {dtype}: export as bfloat16 or float32")
        model.save_pretrained(str(tmp), safe_serialization=True)
        if carry is not None and carry[0] and carry[1] and not hasattr(model, "peft_config"):
            carry_weights(tmp, carry[0], carry[1], getattr(model, "base_model_prefix", ""))
        progress.update()
        if hasattr(model, "peft_config"):  # name the base model the adapter was trained on, not this export
            saved = json.loads((tmp / ADAPTER_CONFIG).read_text())
            saved["base_model_name_or_path"] = json.loads((hf / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(saved, indent=2))
        length, side = trained_limits(meta)
        limits = {"model_max_length": length, "truncation_side": side} if length else {}
        transformers.AutoTokenizer.from_pretrained(str(hf), **limits).save_pretrained(str(tmp))
        progress.update()
        from dist_train.checkpoint.card import write_card
        from dist_train.tasks import TASK_FILE

        if (hf / TASK_FILE).is_file():
            shutil.copy(hf / TASK_FILE, tmp / TASK_FILE)
        write_card(tmp, meta, shown=out_dir)
        owned.replace(tmp, out_dir, EXPORT_KIND, legacy=legacy, what="the export directory")
    finally:
        owned.discard(tmp)
    return out_dir
