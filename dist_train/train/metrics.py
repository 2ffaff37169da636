"""Throughput, MFU, goodput and the metrics log (metrics.jsonl, TensorBoard, one console line per log step).

MFU = FLOPs computed (model/build.py's FlopsModel over the real tokens and lengths of each step)
per second ÷ (peak FLOP/s per worker × workers). The peak is a data-sheet value on known GPUs at
the run's precision, and measured elsewhere (a large matmul on an unknown GPU; on CPU a bf16 or
fp32 matmul with the worker's thread count, since CPU peaks vary too much for a table).
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from dist_train.config.schema import headline
from dist_train.outputs import read_attempts

# Dense peaks (FLOP/s) from the vendors' data sheets, by device name as torch reports it ("NVIDIA H100
# PCIe", "NVIDIA A100-SXM4-80GB"), most specific pattern first and matched on word boundaries, so an
# L40 never gets an L4's figure. Values: (bf16/fp16 tensor-core dense, fp32 without TF32), since
# torch computes fp32 matmuls without TF32 by default. None: not in the table, measured.
GPU_PEAKS: list[tuple[str, str, float, float | None]] = [
    (r"\bH200 NVL\b", "H200 NVL", 835e12, 60e12),
    (r"\bH200\b", "H200", 989e12, 67e12),
    (r"\bH100 NVL\b", "H100 NVL", 835e12, 60e12),
    (r"\bH100 PCIe\b", "H100 PCIe", 756e12, 51e12),
    (r"\bH100\b", "H100 SXM", 989e12, 67e12),
    (r"\bB200\b", "B200", 2250e12, None),
    (r"\bA100\b", "A100", 312e12, 19.5e12),
    (r"\bL40S\b", "L40S", 362e12, 91.6e12),
    (r"\bL40\b", "L40", 181e12, 90.5e12),
    (r"\bL4\b", "L4", 121e12, 30.3e12),
    (r"\bA10\b", "A10", 125e12, 31.2e12),
    (r"\bRTX A6000\b", "RTX A6000", 155e12, 38.7e12),
]


def table_peak(name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """The data-sheet peak of GPU `name` at `dtype`, and its table key; None when the table has no
    figure for it (an unknown GPU, or an fp32 peak not listed)."""
    for pattern, key, half, fp32 in GPU_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            peak = fp32 if dtype == torch.float32 else half
            return (peak, key) if peak is not None else None
    return None


def device_peak_flops(use_gpu: bool, dtype: torch.dtype, threads: int) -> tuple[float, str]:
    """Peak FLOP/s of the device one worker uses at `dtype`, and where the figure comes from: the
    table for known GPUs, else a large matmul measured on the device (CPU: with the worker's threads)."""
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if (found := table_peak(name, dtype)) is not None:
            return found[0], f"table:{found[1]} {str(dtype)[6:]}"
        return measure_matmul_peak(dtype, threads, device="cuda", n=8192), f"measured:{name} {str(dtype)[6:]}"
    if dtype == torch.bfloat16:
        from dist_train.config.hardware import cpu_has_bf16

        if not cpu_has_bf16():  # emulated bf16 converts to fp32: the fp32 peak is the hardware's ceiling
            return (measure_matmul_peak(torch.float32, threads),
                    f"measured:cpu x{threads} threads float32 (no native bfloat16)")
    return measure_matmul_peak(dtype, threads), f"measured:cpu x{threads} threads {str(dtype)[6:]}"


def measure_matmul_peak(dtype: torch.dtype, threads: int, device: str = "cpu", n: int = 1024,
                        seconds: float = 0.6) -> float:
    """Best observed FLOP/s of an n×n matmul: the practical peak the model's matmuls can reach."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # untimed: the first call pays for kernel selection (oneDNN JIT)
        best, runs = 0.0, 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or runs < 3:  # a slow first run must not be the only one
            runs += 1
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(prev)


def memory_mb() -> dict[str, float]:
    """This process's memory in MiB: peak allocated and reserved on a GPU (and host peak RSS), or
    host peak RSS on CPU, where it is the analogue of GPU memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"mem_mb": torch.cuda.max_memory_allocated() / 2**20,
                "mem_reserved_mb": torch.cuda.max_memory_reserved() / 2**20, "host_rss_mb": rss}
    return {"mem_mb": rss}


class Throughput:
    """Steady-state tokens/s and FLOP/s: the first `skip` log intervals (compilation, warm caches) are
    not counted, unless nothing else was measured (a run too short for a steady state)."""

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.steps = 0
        self.tokens = self.all_tokens = 0
        self.seconds = self.all_seconds = self.flops = self.all_flops = 0.0

    def add(self, tokens: int, seconds: float, flops: float = 0.0) -> None:
        self.steps += 1
        self.all_tokens += tokens
        self.all_seconds += seconds
        self.all_flops += flops
        if self.steps > self.skip:
            self.tokens += tokens
            self.seconds += seconds
            self.flops += flops

    @property
    def tokens_per_s(self) -> float:
        if self.seconds > 0:
            return self.tokens / self.seconds
        return self.all_tokens / self.all_seconds if self.all_seconds > 0 else 0.0

    @property
    def flops_per_s(self) -> float:
        if self.seconds > 0:
            return self.flops / self.seconds
        return self.all_flops / self.all_seconds if self.all_seconds > 0 else 0.0

    @property
    def flops_per_token(self) -> float:
        """The measured FLOPs per real token (attention over the lengths that occurred)."""
        tokens, flops = (self.tokens, self.flops) if self.seconds > 0 else (self.all_tokens, self.all_flops)
        return flops / tokens if tokens else 0.0


class RunClock:
    """Wall time of every attempt at a stage, restarts included: the denominator of goodput.

    Each attempt appends {start, end} to a small JSON file and moves its `end` at every log step,
    so an attempt that dies counts up to its last log line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.attempts: list[dict[str, float]] = read_attempts(path)
        now = time.time()
        self.attempts.append({"start": now, "end": now})
        self.tick()

    def tick(self) -> None:
        self.attempts[-1]["end"] = time.time()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.attempts))
        tmp.replace(self.path)

    @property
    def wall_s(self) -> float:
        return sum(a["end"] - a["start"] for a in self.attempts)


def goodput(tokens: int, steady_tokens_per_s: float, clock: RunClock) -> dict[str, float]:
    """Useful tokens per second of wall time over all attempts, and the share of that wall time
    that steady-state training would have needed (1.0 = no time lost to startup, restarts, evals,
    checkpoints or redone steps)."""
    wall = max(clock.wall_s, 1e-9)
    ideal = tokens / steady_tokens_per_s if steady_tokens_per_s > 0 else 0.0
    return {"goodput_tokens_per_s": tokens / wall, "goodput": min(ideal / wall, 1.0), "wall_s_all_attempts": wall,
            "attempts": len(clock.attempts)}


def format_duration(seconds: float) -> str:
    """3:07:05, 7:05 or 5s: the ETA column."""
    s = round(max(seconds, 0.0))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}" if m else f"{sec}s"


def format_eval(evaluation: dict[str, Any], sep: str = " ") -> str:
    """An evaluation's headline figures, forgetting as a percentage."""
    return " ".join(f"{k}{sep}{v:+.1%}" if k == "forgetting" else f"{k}{sep}{v:.4g}"
                    for k, v in headline(evaluation).items())


def eval_part(row: dict[str, Any]) -> str:
    evals = format_eval({k[5:]: v for k, v in row.items() if k.startswith("eval_")})
    return f" | eval {evals}" if evals else ""


def console_line(stage: str, row: dict[str, Any], max_steps: int, eta_s: float | None) -> str:
    """One compact line per log interval: stage, step/max, loss, lr, tokens/s, MFU, ETA, then the
    evaluation's metrics when there was one. A row of an evaluation alone (the step-0 baseline)
    gives its phase and figures."""
    if "loss" not in row:
        return f"[{stage}] {row['step']}/{max_steps} {row.get('phase', 'evaluation')}{eval_part(row)}"
    line = (f"[{stage}] {row['step']}/{max_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
            f"{row['tokens_per_s']:,.0f} tok/s mfu {row['mfu']:.1%}")
    if eta_s is not None:
        line += f" eta {format_duration(eta_s)}"
    return line + eval_part(row)


class MetricsLog:
    """Rank 0's metrics writer: metrics.jsonl, TensorBoard events and the console line. Other
    ranks get a silent one (path None).

    Every row also gets its wall time and the attempt it belongs to, so a report can put
    throughput on a time axis and mark restarts. The ETA counts only this attempt's steps, so it
    is right after a resume too.
    """

    def __init__(self, path: Path | None, stage: str, max_steps: int, console: TextIO | None,
                 tensorboard: Path | None = None, clock: RunClock | None = None, start_step: int = 0,
                 attempt: float = 0.0) -> None:
        self.stage, self.max_steps, self.console, self.clock = stage, max_steps, console, clock
        self.start_step, self.attempt = start_step, attempt
        self.file = open(path, "a") if path is not None else None
        self.tb = None
        if path is not None and tensorboard is not None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard), flush_secs=10)
        self.start = time.time()
        self.skipped = 0

    def log(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        now = time.time()
        self.file.write(json.dumps({**row, "time": now, "attempt": self.attempt}) + "\n")
        self.file.flush()
        if self.clock is not None:
            self.clock.tick()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.tb.add_scalar(f"{self.stage}/{name}", value, row["step"], walltime=now)
        if self.console is not None and "loss" not in row:
            print(console_line(self.stage, row, self.max_steps, None), file=self.console, flush=True)
        elif self.console is not None:
            done = row["step"] - self.start_step
            eta = (now - self.start) / done * (self.max_steps - row["step"]) if done > 0 else None
            line = console_line(self.stage, row, self.max_steps, eta)
            if row.get("skipped_steps", 0) > self.skipped:  # fp16 overflow: say so, once per log line
                line += (f" | overflow: {row['skipped_steps'] - self.skipped} step(s) skipped, "
                         f"loss_scale={row.get('loss_scale', float('nan')):.0f}")
                self.skipped = row["skipped_steps"]
            print(line, file=self.console, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
