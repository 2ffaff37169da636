"""Against the hardware (`python -m bench mfu`): MFU of the training step on the measured bf16 matmul
peak, where a step's time goes, and each optimization measured on/off.

Two real DeepSpeed ranks on gloo, one thread each, run dist_train's own pieces (model builder,
rendered DeepSpeed config, data plan and loader, loss, engine) on the workload of bench/workload.py.
The peak is an n×n bf16 matmul timed on both ranks at once, as the workers measure it.
Each variant changes one thing from the defaults; all variants run in one session, in turn,
`repeats` times, and the median step time counts.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.workload import MICRO, SEQ, Workload, free_port

STEPS, WARMUP = 5, 2
# name -> (what it changes, how): the defaults are the fastest measured; each row switches one off.
VARIANTS = {
    "defaults": ("dist_train's defaults", {"profile": True}),
    "small_buckets": ("reduce bucket = hidden² (HF 'auto'), no floor",
                      {"ds": {"zero_optimization": {"reduce_bucket_size": 512**2}}}),
    "unfused_adamw": ("torch AdamW, for-loop implementation (not fused)",
                      {"ds": {"optimizer": {"params": {"fused": False}}}}),
    "ds_fused_adam": ("DeepSpeed FusedAdam (JIT-built op) instead of torch's fused AdamW",
                      {"ds": {"optimizer": {"params": {"torch_adam": False, "fused": None}}}}),
    "eager_attention": ("eager attention (matmul + softmax) instead of scaled_dot_product_attention",
                        {"attn": "eager"}),
    "overlap_comm": ("ZeRO overlap_comm on (the GPU default)", {"ds": {"zero_optimization": {"overlap_comm": True}}}),
    "no_prefetch": ("no background prefetch of the next batch", {"prefetch": False}),
    "sync_every_step": ("read the loss on the host every step (a GPU would stall each step; CPU runs "
                        "synchronously anyway)", {"sync": True}),
    "checkpointing": ("activation checkpointing on (memory for time)", {"checkpointing": True}),
}
NAIVE = "naive_autocast"
DECISIONS = (
    "Decisions, from this session and two earlier ones of the same day (medians ÷ defaults: no bucket floor "
    "0.81, 0.91, 0.88; unfused AdamW 0.91, 0.95, 0.98; overlap_comm 0.92, 0.95, 0.94): the reduce-bucket floor "
    "and torch's fused AdamW are the defaults; overlap_comm stays off on CPU (on on GPU, where a side stream "
    "overlaps it); DeepSpeed's FusedAdam is no faster and needs a JIT build; activation checkpointing is a "
    "memory trade, off unless asked for. Eager attention was faster at this length in two of three sessions "
    "(and 19% slower at 1024 tokens in a separate single-process test), but as a CPU default the two-rank test "
    "processes then aborted intermittently at exit ('terminate called without an active exception', 3 of 3 "
    "runs of tests/dist/test_engine.py against 0 of 1 with sdpa); not understood, so sdpa stays. "
    "torch.compile (DeepSpeed's engine.compile()) was tried once outside this harness: 44 s to compile, then a "
    "6% shorter step; not adopted (recompiles for evaluation, untested with checkpointing, LoRA and ZeRO-3).")
NAIVE_DESCRIPTION = "fp32 weights + torch.autocast(bf16), DDP, torch AdamW, loss read every step"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


class CommTimer:
    """Wall time inside torch.distributed collectives (DeepSpeed's ZeRO reductions and gathers go
    through them), by wrapping the module functions for the duration of the benchmark."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "broadcast",
             "reduce_scatter", "all_reduce_coalesced")

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in self.NAMES:
            fn = getattr(torch.distributed, name, None)
            if fn is not None:
                setattr(torch.distributed, name, self._wrap(fn))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def _rank(rank: int, world: int, port: int, root: str, names: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from dist_train.launch.worker import quiet_libraries
    from dist_train.train.metrics import measure_matmul_peak
    from dist_train.world import World

    quiet_libraries()
    w = World(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    torch.distributed.barrier()
    peak = measure_matmul_peak(torch.bfloat16, 1, seconds=2.0)  # both ranks at once, as the workers do
    comm = CommTimer()
    results = {"peak_flops": peak, "variants": {}}
    # A throwaway run first: the first engine of a process measured a few percent slower than later
    # ones (allocator and oneDNN caches warming), which would bias whichever variant came first.
    train_variant(w, Path(root) / "bench-2w.yaml", {}, comm, steps=WARMUP + 1)
    for name in names:
        torch.distributed.barrier()
        config = Path(root) / "bench-2w.yaml"
        change = VARIANTS[name][1] if name != NAIVE else None
        results["variants"][name] = _naive(w, config) if change is None else train_variant(w, config, change, comm)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _parts(w, config: Path, checkpointing: bool = False):
    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import load_config
    from dist_train.train.pretrain import build_pretrain

    cfg = load_config(config, [f"pretrain.train.gradient_checkpointing={str(checkpointing).lower()}"])
    d = derive_stage(cfg, "pretrain", w.world_size)
    return cfg, d, build_pretrain(cfg, d, w)


def _sync(w) -> None:
    """Wait for the device: on a GPU the timers must not measure kernel launches only."""
    if w.device.startswith("cuda"):
        torch.cuda.synchronize()


def train_variant(w, config: Path, change: dict, comm: CommTimer, steps: int = STEPS) -> dict:
    """Train `steps` steps of a config's pretrain stage with dist_train's pieces and one change from
    its defaults; per-phase medians over the steps after WARMUP."""
    from dist_train.data.stream import Prefetcher
    from dist_train.model.build import flops_per_token
    from dist_train.train.engine import build_engine

    cfg, d, parts = _parts(w, config, change.get("checkpointing", False))
    if "attn" in change:
        parts.model.set_attn_implementation(change["attn"])
    engine = build_engine(parts.model, _merge(d.deepspeed, change.get("ds", {})), cfg.pretrain.optim.weight_decay)
    source = parts.batches(0)
    batches = Prefetcher(source) if change.get("prefetch", True) else source
    fpt = flops_per_token(parts.model, d.seq_len)
    phases: list[dict[str, float]] = []
    profiler = None
    for i in range(steps + (1 if change.get("profile") else 0)):
        if i == steps:  # one more step, under torch.profiler: where the time goes by kind of op
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU])
            profiler.__enter__()
        comm.take()
        _sync(w)
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        targets, _ = w.all_reduce_sum([sum(batch.targets), 0.0])  # the loop's per-step agreement
        fwd = bwd = opt = c_bwd = c_opt = 0.0
        losses = []
        for micro in batch.micro:
            a = time.perf_counter()
            micro = engine._to_device(micro)
            labels = micro.pop("labels")
            loss = parts.loss_fn(engine.ds(**micro).logits, labels)
            _sync(w)
            b = time.perf_counter()
            comm.take()
            engine.ds.backward(loss * (w.world_size * len(batch.micro) / targets))
            _sync(w)
            c = time.perf_counter()
            c_bwd += comm.take()
            engine.step()
            _sync(w)
            e = time.perf_counter()
            c_opt += comm.take()
            losses.append(loss.detach())
            if change.get("sync"):
                float(losses[-1])
            fwd, bwd, opt = fwd + b - a, bwd + c - b, opt + e - c
        end = time.perf_counter()
        phases.append({"data": t1 - t0, "forward": fwd, "backward_compute": bwd - c_bwd, "comm": c_bwd + c_opt,
                       "optimizer": opt - c_opt, "step": end - t0})
    ops = None
    if profiler is not None:
        profiler.__exit__(None, None, None)
        phases.pop()
        ops = op_kinds(profiler.key_averages())
    steady = phases[WARMUP:] or phases
    med = {k: statistics.median(p[k] for p in steady) for k in steady[0]}
    tokens = batch.tokens * w.world_size
    return {"phases": med, "tokens_per_s": tokens / med["step"], "flops_per_token": fpt, "ops": ops,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if w.device.startswith("cuda") else None}


OP_KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
            ("attention", ("scaled_dot_product", "aten::_softmax", "aten::softmax")),
            ("optimizer", ("adam", "optimizer")),
            ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss")),
            ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::contiguous")))


def op_kinds(averages) -> dict[str, float]:
    """Self CPU seconds of one step's ops, grouped by kind (first matching pattern wins)."""
    out: dict[str, float] = {}
    for ev in averages:
        name = ev.key.lower()
        kind = next((k for k, pats in OP_KINDS if any(p.lower() in name for p in pats)), "other elementwise")
        out[kind] = out.get(kind, 0.0) + ev.self_cpu_time_total / 1e6
    return out


def _naive(w, config: Path) -> dict:
    """The usual first attempt: fp32 weights, torch.autocast(bf16), DDP, torch AdamW, the loss read each step."""
    from torch.nn.parallel import DistributedDataParallel

    from dist_train.model.build import flops_per_token

    _, _, parts = _parts(w, config)
    model = DistributedDataParallel(parts.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = parts.batches(0)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        for micro in next(batches).micro:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=micro["input_ids"], labels=micro["labels"]).loss
            loss.backward()
            float(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[WARMUP:])
    return {"phases": {"step": step}, "tokens_per_s": MICRO * SEQ * w.world_size / step,
            "flops_per_token": flops_per_token(parts.model, SEQ)}


def run(repeats: int = 3) -> dict:
    import torch.multiprocessing as mp

    names = [NAIVE, *VARIANTS]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        wl = Workload(Path(tmp))
        for r in range(repeats):
            out = f"{tmp}/mfu{r}.json"
            mp.spawn(_rank, args=(2, free_port(), tmp, names if r % 2 == 0 else names[::-1], out), nprocs=2,
                     join=True)
            runs.append(json.loads(Path(out).read_text()))
        del wl
    peak = statistics.median(r["peak_flops"] for r in runs)
    rows = {}
    for name in names:
        per = [r["variants"][name] for r in runs]
        tps = statistics.median(p["tokens_per_s"] for p in per)
        phases = {k: statistics.median(p["phases"][k] for p in per) for k in per[0]["phases"]}
        rows[name] = {"tokens_per_s": tps, "mfu": per[0]["flops_per_token"] * tps / (2 * peak), "phases": phases,
                      "runs_tokens_per_s": [round(p["tokens_per_s"], 1) for p in per]}
    base = rows["defaults"]["tokens_per_s"]
    for row in rows.values():
        row["vs_defaults"] = row["tokens_per_s"] / base
    _print(rows, peak)
    ops = next((r["variants"]["defaults"]["ops"] for r in runs if r["variants"]["defaults"].get("ops")), None)
    return {"peak_flops_per_worker": peak, "world_size": 2, "ops": ops, "seq_len": SEQ, "micro_batch": MICRO,
            "flops_per_token": runs[0]["variants"]["defaults"]["flops_per_token"], "rows": rows,
            "describe": {k: v[0] for k, v in VARIANTS.items()} | {NAIVE: NAIVE_DESCRIPTION}}


def _print(rows: dict, peak: float) -> None:
    print(f"bf16 matmul peak per worker: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'variant':18} {'tokens/s':>9} {'MFU':>6} {'vs defaults':>11}")
    for name, row in rows.items():
        print(f"{name:18} {row['tokens_per_s']:9.0f} {row['mfu']:6.1%} {row['vs_defaults']:11.3f}")


def markdown(r: dict) -> str:
    m, rows = r["machine"], r["rows"]
    d = rows["defaults"]
    lines = [
        "## MFU against the hardware, the profile of a step, optimizations on/off (`python -m bench mfu`)", "",
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}. The workload of the "
        "throughput benchmark, run by dist_train's own pieces (model builder, rendered DeepSpeed config, data "
        "plan and loader, loss, engine) on 2 DeepSpeed ranks over gloo, one thread each, without Ray. "
        f"Peak: a 1024×1024 bf16 matmul on one thread, timed on both ranks at once: "
        f"**{r['peak_flops_per_worker'] / 1e9:.0f} GFLOP/s per worker**. MFU = "
        f"{r['flops_per_token'] / 1e6:.0f} MFLOP/token (6·N + 12·L·H·T) × tokens/s ÷ (2 × peak). Each row "
        "changes one thing from the defaults; medians of the steps after the first two, then of the runs.", "",
        "| variant | tokens/s | MFU | ÷ defaults | each run (tokens/s) |", "|---|---:|---:|---:|---|"]
    for name, row in rows.items():
        label = "**defaults**" if name == "defaults" else r["describe"][name]
        runs = ", ".join(f"{v:,.0f}" for v in row.get("runs_tokens_per_s", []))
        lines.append(f"| {label} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | {row['vs_defaults']:.3f} | {runs} |")
    lines += ["", "The same variant varied by up to ±10% between runs here (see the last column): a default follows "
              "only a difference that held in the medians of repeated sessions."]
    lines += ["", DECISIONS]
    ok = d["mfu"] >= 0.45
    lines += ["", f"MFU with the defaults: **{d['mfu']:.1%}** (goal ≥ 45%: {'**met**' if ok else '**not met**'}).",
              "", "**Where a default step's time goes** (median seconds per step; communication is the wall time "
              "inside torch.distributed collectives, taken out of backward and optimizer):", "",
              "| data | forward | backward | communication | optimizer | step |", "|---:|---:|---:|---:|---:|---:|"]
    p = d["phases"]
    lines.append(" | ".join(["", *(f"{p[k]:.3f}" for k in ("data", "forward", "backward_compute", "comm",
                                                              "optimizer", "step")), ""]).strip())
    ops = r.get("ops")
    if ops:
        total = sum(ops.values())
        lines += ["", "**By kind of op** (torch.profiler, self CPU time of one step on rank 0):", "",
                  "| kind | seconds | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
