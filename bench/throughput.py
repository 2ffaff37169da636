"""Against the peers (`python -m bench throughput`): steady-state tokens/s of the same workload
(bench/workload.py: ~30M Llama, seq 256, global batch 8, ZeRO-2, bf16, 2 workers × 1 thread) run by

- dist_train (`dist-train run`: Ray Train, DeepSpeed, the data plan, ledger, heartbeat);
- a plain `torchrun` + DeepSpeed loop with the same DeepSpeed config (the floor);
- Hugging Face `Trainer` + DeepSpeed with the transformers guide's ZeRO-2 config (what users run);
- dist_train's worker body under `torchrun` without Ray (splits the floor's gap into loop and Ray);

and weak scaling: dist_train on 1 worker vs 2 (same per-worker batch), the CPU that Ray's own
processes take meanwhile, and the loader's headroom at the measured step rate. The systems run in
turn, `repeats` times (order alternating), and medians count: the machine is shared and noisy.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.workload import HF_GUIDE_ZERO2, MICRO, SEQ, Workload

SYSTEMS = ("dist_train", "torchrun_deepspeed", "hf_trainer_deepspeed", "dist_train_loop_torchrun", "dist_train_1w")


class CpuShare:
    """CPU used by each process group while a dist_train run trains: its Ray workers, and every
    other process (Ray's GCS, raylet, dashboard, Train controller actors; the driver). Sampled over
    `window` seconds from the run's first metrics line (training is under way then)."""

    def __init__(self, metrics: Path, window: float = 6.0) -> None:
        self.metrics, self.window = metrics, window
        self.result: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                t = p.cpu_times()
                label = " ".join(p.info["cmdline"] or [p.info["name"] or ""])[:60]
                out[p.pid] = (label, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _run(self) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (self.metrics.is_file() and self.metrics.stat().st_size):
            time.sleep(0.2)
        a = self._snapshot()
        time.sleep(self.window)
        b = self._snapshot()
        workers = other = 0.0
        for pid, (label, t) in b.items():
            if pid not in a or pid == os.getpid():  # not this benchmark's own process
                continue
            d = (t - a[pid][1]) / self.window
            if "RayTrainWorker" in label:
                workers += d
            elif any(k in label for k in ("python", "ray", "gcs_server", "raylet", "dist-train")):
                other += d
        self.result = {"workers_cores": workers, "ray_and_driver_cores": other}


def run(repeats: int = 2) -> dict:
    from bench.data import bench_loader

    samples: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        wl = Workload(Path(tmp))
        ds = wl.deepspeed()
        runners = {
            "dist_train": lambda: _dist_train(wl, 2),
            "torchrun_deepspeed": lambda: wl.run_peer("ds_loop.py", ds),
            "hf_trainer_deepspeed": lambda: wl.run_peer("hf_trainer.py", HF_GUIDE_ZERO2),
            "dist_train_loop_torchrun": lambda: wl.run_peer("dist_train_loop.py"),
            "dist_train_1w": lambda: _dist_train(wl, 1),
        }
        for r in range(repeats):
            for name in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
                t0 = time.perf_counter()
                res = runners[name]()
                res["wall_s"] = time.perf_counter() - t0
                samples[name].append(res)
                print(f"  repeat {r + 1}/{repeats} {name:26} {res['tokens_per_s']:8.0f} tokens/s "
                      f"({res['wall_s']:.0f} s)", flush=True)
        loader = bench_loader(wl.data / "shards", repeats, global_batch=MICRO * 2, lanes=2)
    tps = {name: statistics.median(s["tokens_per_s"] for s in runs) for name, runs in samples.items()}
    dt = samples["dist_train"]
    out = {
        "tokens_per_s": tps, "samples": samples,
        "mfu_dist_train": statistics.median(s["mfu"] for s in dt),
        "peak_flops_per_worker": statistics.median(s["peak_flops_per_worker"] for s in dt),
        "flops_per_token": dt[0]["flops_per_token"],
        "ratio_vs_torchrun": tps["dist_train"] / tps["torchrun_deepspeed"],
        "ratio_vs_hf_trainer": tps["dist_train"] / tps["hf_trainer_deepspeed"],
        "loop_ratio_vs_torchrun": tps["dist_train_loop_torchrun"] / tps["torchrun_deepspeed"],
        "ray_ratio": tps["dist_train"] / tps["dist_train_loop_torchrun"],
        "weak_scaling_efficiency": tps["dist_train"] / (2 * tps["dist_train_1w"]),
        "cpu_share": {k: statistics.median(s["cpu"][k] for s in dt) for k in dt[0]["cpu"]},
        "data_wait_frac": statistics.median(s["data_wait_frac"] for s in dt),
        "loader_tokens_per_s_per_rank": loader["loader_tokens_per_s_per_rank"],
        "seq_len": SEQ, "micro_batch": MICRO, "params": samples["torchrun_deepspeed"][0]["params"],
    }
    out["loader_headroom"] = out["loader_tokens_per_s_per_rank"] / (tps["dist_train"] / 2)
    _print(out)
    return out


def _dist_train(wl: Workload, workers: int) -> dict:
    out = wl.root / "runs" / f"{workers}w"
    shutil.rmtree(out, ignore_errors=True)  # the sampler must not see the last run's metrics
    cpu = CpuShare(out / "pretrain" / "metrics.jsonl") if workers == 2 else None
    res = wl.run_dist_train(workers)
    if cpu is not None:
        cpu.thread.join(timeout=10)
        res["cpu"] = cpu.result or {"workers_cores": float("nan"), "ray_and_driver_cores": float("nan")}
    return res


def _print(r: dict) -> None:
    print(f"{'system':28} {'tokens/s':>9}")
    for name, v in r["tokens_per_s"].items():
        print(f"{name:28} {v:9.0f}")
    for key in ("ratio_vs_torchrun", "ratio_vs_hf_trainer", "loop_ratio_vs_torchrun", "ray_ratio",
                "weak_scaling_efficiency", "mfu_dist_train", "loader_headroom"):
        print(f"{key:28} {r[key]:9.3f}")


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(r: dict) -> str:
    m, t = r["machine"], r["tokens_per_s"]
    share = r["cpu_share"]
    rows = [
        ("dist_train (`dist-train run`: Ray Train + DeepSpeed)", t["dist_train"], ""),
        ("plain `torchrun` + DeepSpeed loop, same DeepSpeed config", t["torchrun_deepspeed"], ""),
        ("HF `Trainer` + DeepSpeed, the transformers guide's ZeRO-2 config", t["hf_trainer_deepspeed"], ""),
        ("dist_train's worker body under `torchrun`, no Ray", t["dist_train_loop_torchrun"], ""),
    ]
    lines = [
        "## Throughput against the peers, and scaling (`python -m bench throughput`)", "",
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}. The same workload for "
        f"every system: a Llama-style model of {r['params'] / 1e6:.1f}M parameters (hidden 512, "
        f"8 layers, vocab 8192, tied embeddings), sequence {r['seq_len']}, micro batch {r['micro_batch']} per "
        "worker, global batch 8, ZeRO-2, bf16, 2 workers with one thread each, the same packed token rows. "
        "Steady-state tokens/s: the summed time of the steps after the first two. The systems ran in turn, "
        f"{len(r['samples']['dist_train'])} times each (order alternating); medians. Shared, noisy machine: only "
        "the ratios of runs made side by side mean anything.", "",
        "| system | tokens/s |", "|---|---:|"]
    lines += [f"| {name} | {v:,.0f} |" for name, v, _ in rows]
    lines += [
        "", "| ratio | value | goal | |", "|---|---:|---:|---|",
        f"| dist_train ÷ plain torchrun + DeepSpeed | {r['ratio_vs_torchrun']:.3f} | ≥ 0.98 | "
        f"{_met(r['ratio_vs_torchrun'] >= 0.98)} |",
        f"| dist_train ÷ HF Trainer + DeepSpeed | {r['ratio_vs_hf_trainer']:.3f} | ≥ 1.10 | "
        f"{_met(r['ratio_vs_hf_trainer'] >= 1.10)} |",
        f"| of which: dist_train's loop under torchrun ÷ plain loop | {r['loop_ratio_vs_torchrun']:.3f} | | |",
        f"| of which: dist_train with Ray ÷ its loop under torchrun | {r['ray_ratio']:.3f} | | |",
        f"| weak scaling: 2 workers ÷ (2 × 1 worker), {t['dist_train_1w']:,.0f} tokens/s on 1 | "
        f"{r['weak_scaling_efficiency']:.3f} | | |",
        f"| MFU of the dist_train runs (peak: bf16 matmul, {r['peak_flops_per_worker'] / 1e9:.0f} GFLOP/s per "
        f"worker) | {r['mfu_dist_train']:.1%} | ≥ 45% | {_met(r['mfu_dist_train'] >= 0.45)} |",
        f"| loader headroom: one rank's loader ÷ one rank's training tokens/s "
        f"({r['loader_tokens_per_s_per_rank']:,.0f} ÷ {t['dist_train'] / 2:,.0f}) | {r['loader_headroom']:,.0f}× | "
        f"≥ 20× | {_met(r['loader_headroom'] >= 20)} |",
        f"| data wait share of step time in the dist_train runs | {r['data_wait_frac']:.2%} | ≤ 1% | "
        f"{_met(r['data_wait_frac'] <= 0.01)} |", "",
        f"While dist_train trained, its two workers used {share['workers_cores']:.2f} cores and every other "
        f"process of the run (Ray's GCS, raylet, dashboard, the Train controller's actors, the driver) "
        f"{share['ray_and_driver_cores']:.2f} cores, sampled over 10 s from /proc. On this 2-core machine that "
        "CPU comes out of the workers' share; on a GPU node it runs on host cores the step does not use.",
        "", "What differs between the systems besides the layers around the step:", "",
        "- The plain loop and dist_train use the same rendered DeepSpeed config (dist_train's defaults: a "
        "2.5e7-element reduce bucket, torch's fused AdamW) and the same attention (sdpa).",
        "- HF Trainer runs the guide's ZeRO-2 example as users copy it (5e8-element buckets, overlap_comm, "
        "DeepSpeed's FusedAdam), minus its CPU offload, with Trainer filling the `auto` values.",
    ]
    return "\n".join(lines)
