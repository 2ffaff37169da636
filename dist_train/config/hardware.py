"""What the hardware this process runs on can compute quickly: the probes behind `precision: auto` and the
fp16 refusal. The driver asks them for the workers too: a run's driver and workers use the same kind of machine."""

from __future__ import annotations

from pathlib import Path


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension). Without it
    torch emulates bf16 matmuls (1.3 GFLOP/s against 73 in fp32 on an AVX2 EPYC here). oneDNN's own probe is not
    enough: it says yes on any AVX512 CPU (Skylake, Cascade Lake), where bf16 is emulated too."""
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo (macOS): the best this process can ask is oneDNN
        import torch

        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # an older torch without the probe: assume the slow case, fp32 is always correct
            return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`), or None where it does not."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_has_fp16() -> bool:
    """Whether DeepSpeed's CPU accelerator accepts fp16 here (oneDNN fp16: AVX512-FP16 or AMX-FP16)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # an older torch without the probe: DeepSpeed would refuse too
        return False


def auto_precision(use_gpu: bool) -> tuple[str, str]:
    """The precision `auto` stands for on this machine (the driver's: the same kind as the workers'), and why."""
    if use_gpu:
        return "bf16", "auto: GPUs"
    if cpu_has_bf16():
        return "bf16", "auto: this CPU has native bf16 kernels"
    return "fp32", "auto: this CPU has no native bf16 kernels (AVX512-BF16 or AMX); bf16 would run several times slower"

