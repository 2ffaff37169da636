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
import os
import shutil
from pathlib import Path
from typing import Any

import torch

HF_DIR = "hf"


def describe_model(module: torch.nn.Module, tokenizer: Any, ckpt_dir: Path) -> None:
    """Write the model's HF config (with its class) and tokenizer into a checkpoint being staged."""
    import copy

    config = copy.deepcopy(module.config)
    config.architectures = [type(module).__name__]
    config.dtype = torch.float32
    config.save_pretrained(str(ckpt_dir / HF_DIR))
    tokenizer.save_pretrained(str(ckpt_dir / HF_DIR))


def checkpoint_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from one committed checkpoint directory."""
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    zero = meta["config"][meta["stage"]]["deepspeed"]["zero_stage"]
    if zero == 0:  # no ZeRO partitions: the module's own weights (the working precision)
        model_file = next(ckpt_dir.glob("mp_rank_00_model_states.pt"))
        states = torch.load(model_file, map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It narrates every shard it reads, with progress bars: keep the console for our own lines.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
        return {name: t.contiguous() for name, t in lazy.items()}  # one parameter at a time


def export_checkpoint(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write `out_dir` from a committed checkpoint directory; returns it."""
    import transformers

    hf = ckpt_dir / HF_DIR
    if not (hf / "config.json").is_file():
        raise ValueError(f"{ckpt_dir} is not a committed dist-train checkpoint (no {HF_DIR}/config.json): "
                         "point at <output_dir>/<stage>/checkpoints/step_N")
    config = transformers.AutoConfig.from_pretrained(str(hf))
    model_cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):  # no memory for random weights that are overwritten anyway
        model = model_cls(config)
    model.load_state_dict(checkpoint_state_dict(ckpt_dir), strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{ckpt_dir} lacks weights for {missing[:3]}: the checkpoint is incomplete")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(hf)).save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
