"""Which attention kernel a model runs (`model.attention`), chosen before the model is built.

`auto` takes the variable-length flash-attention kernel on a CUDA GPU where the flash_attn package
is importable and the stage computes in bf16 or fp16 (it has no fp32 kernel); packed SFT rows then
reach it through their position_ids, without a mask. Everywhere else `auto` takes PyTorch's
scaled_dot_product_attention. On this project's CPU benchmarks eager attention (matmul + softmax) was
faster at 128 tokens in two of three sessions and 19% slower at 1024 (docs/benchmarks.md), so it is
not the CPU default; it stays selectable. The choice is not written into exports: transformers picks
its own default again when it loads one.
"""

from __future__ import annotations

import importlib.util


def flash_attn_importable() -> bool:
    """Whether the flash_attn package is installed in this Python (it is not imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(setting: str, *, on_gpu: bool, precision: str, flash_available: bool) -> tuple[str, str]:
    """(implementation, why) for a stage: `setting` itself unless it is "auto"."""
    if setting != "auto":
        return setting, "model.attention"
    if not on_gpu:
        return "sdpa", "auto: on CPU"
    if not flash_available:
        return "sdpa", "auto: flash_attn is not installed"
    if precision not in ("bf16", "fp16"):
        return "sdpa", f"auto: flash attention has no {precision} kernel"
    return "flash_attention_2", "auto: a GPU, flash_attn and " + precision
