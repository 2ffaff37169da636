"""Export a stage's final weights as a plain Hugging Face directory (safetensors + config + tokenizer).

The weights come from the committed DeepSpeed checkpoint, consolidated to fp32 from the
ZeRO master copies (not the bf16 working copies), so the export is as exact as training. The
directory appears atomically: written beside it, then renamed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dist_train.model.build import save_hf
from dist_train.world import World


def consolidated_state_dict(engine: Any, ckpt_root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a committed checkpoint (rank 0 only: reads every shard)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It narrates every shard it reads, with progress bars: keep the console for our own lines.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)


def export_hf(engine: Any, *, ckpt_root: Path, tag: str, zero_stage: int, tokenizer: Any, out_dir: Path,
              world: World) -> None:
    """Write out_dir from checkpoint `tag` (collective: every rank calls it; rank 0 writes)."""
    world.barrier()
    if world.is_main:
        state = consolidated_state_dict(engine, ckpt_root, tag, zero_stage)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(engine.module, state, tokenizer, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    world.barrier()
