"""Fine-tuning against the peers (`python -m bench finetune`): real (non-pad) tokens/s of the same
fine-tune run by

- dist_train (`dist-train run --stage finetune`: Ray Train, DeepSpeed, length-grouped micro batches);
- dist_train with `finetune.data.group_by_length: false` (plain shuffling: what it did before);
- Hugging Face `Trainer` + DeepSpeed with its default random sampler and padding collator;
- the same Trainer with `train_sampling_strategy="group_by_length"` (its LengthGroupedSampler);

on two of the quickstart's tasks: classification of Python docstrings (max_length 256) and SFT
(prompt/response, max_length 320). A small Llama (hidden 256, 4 layers, vocab 8192) from a fixed
random initialisation, global batch 32 = 2 workers × micro batch 8 × 2 accumulation steps, ZeRO-2,
bf16, one thread per worker, the same optimizer settings. Each run trains one whole epoch (every
example once), and its figure is the real tokens of the epoch's steps after the first 2 over their
time: a window of a few steps would favour whichever sampler happens to serve long examples first
(HF's sorts each 800-example megabatch longest first), since a step of long examples spends less of
its time on fixed costs. The systems run in turn, `repeats` times (order alternating); the claim is
the ratio of medians with a bootstrap interval (bench/stats.py).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.stats import ratio_of_medians
from bench.workload import BIN, HF_GUIDE_ZERO2, REPO, free_port

ARCH = {"family": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 704,
        "max_position_embeddings": 512}
VOCAB, GLOBAL, MICRO, WORKERS, WARMUP, LR = 8192, 32, 8, 2, 2, 1.0e-3
TASKS = {"classification": ("sequence_classification", "train.jsonl", 256),
         "sft": ("sft", "sft_train.jsonl", 320)}
SYSTEMS = ("dist_train", "dist_train_ungrouped", "hf_trainer", "hf_trainer_grouped")
# issue 20's goals; against its own ungrouped plan the ratio is what grouping buys (no goal)
GOALS: dict[str, float | None] = {"hf_trainer": 1.5, "hf_trainer_grouped": 1.15, "dist_train_ungrouped": None}


def config_text(data: Path, out: Path, task: str, grouped: bool, steps: int = 50) -> str:
    """A fine-tune-only dist_train config: fresh weights from `ARCH` (init_from null), no evaluation,
    checkpoint or test inside the timed steps."""
    name, train, max_length = TASKS[task]
    arch = ", ".join(f"{k}: {v}" for k, v in ARCH.items())
    return f"""
output_dir: {out}
seed: 0
ray: {{num_workers: {WORKERS}, use_gpu: false, cpus_per_worker: 1}}
model:
  tokenizer: {data}/tokenizer
  arch: {{{arch}}}
finetune:
  task: {name}
  init_from: null
  data: {{train: {data}/task/{train}, max_length: {max_length}, validation_fraction: 0.0, test_fraction: 0.0,
          group_by_length: {str(grouped).lower()}}}
  deepspeed: {{zero_stage: 2, precision: bf16}}
  optim: {{lr: {LR}, weight_decay: 0.01, warmup_steps: 2, schedule: cosine}}
  train: {{max_steps: {steps}, global_batch_size: {GLOBAL}, micro_batch_size: {MICRO},
          log_every: {WARMUP // 2}, eval_every: 0, save_every: 0}}
"""


def run(repeats: int = 3) -> dict:
    from dist_train.data.quickstart import prepare_python_docs

    out: dict = {"tasks": {}, "repeats": repeats, "warmup_steps": WARMUP, "global_batch": GLOBAL,
                 "micro_batch": MICRO, "workers": WORKERS, "arch": ARCH}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_python_docs(root / "data", seq_len=256, vocab_size=VOCAB, progress=False)
        for task in TASKS:
            shares, steps = padding_shares(root, data, task)
            samples: dict[str, list[float]] = {s: [] for s in SYSTEMS}
            for r in range(repeats):
                for system in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
                    t0 = time.perf_counter()
                    tps = _run(system, root, data, task, steps)
                    samples[system].append(tps)
                    print(f"  {task} repeat {r + 1}/{repeats} {system:22} {tps:8.0f} real tokens/s "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
            out["tasks"][task] = {**summarise(samples, shares), "steps": steps}
            _print(task, out["tasks"][task])
    return out


def summarise(samples: dict[str, list[float]], shares: dict[str, float]) -> dict:
    """Medians, and dist_train's ratio to each other system with its interval and verdict."""
    ratios = {}
    for other, goal in GOALS.items():
        r = ratio_of_medians(samples["dist_train"], samples[other])
        ratios[other] = {"value": r.value, "low": r.low, "high": r.high, "goal": goal,
                         "verdict": r.verdict(goal) if goal is not None else None}
    return {"samples": samples, "median": {s: statistics.median(v) for s, v in samples.items()},
            "ratios": ratios, "real_share": shares}


def padding_shares(root: Path, data: Path, task: str) -> tuple[dict[str, float], int]:
    """The share of computed positions that are real tokens over the timed steps of the first epoch,
    from the same pure plan the workers follow: length-grouped, and plain shuffling (which HF's random
    sampler matches); and the epoch's step count."""
    from dist_train.config.loader import load_config
    from dist_train.data.tasks import epoch_batches, rank_micro_batches, steps_per_epoch
    from dist_train.model.build import load_tokenizer
    from dist_train.tasks import build_task
    from dist_train.tasks.batching import pad_width
    from dist_train.tasks.records import read_splits, task_spec

    cfg = load_config(_write_config(root, data, task, True))
    train, _, _ = read_splits(cfg)
    tok = load_tokenizer(cfg.model.tokenizer)
    lengths = [len(e["input_ids"]) for e in build_task(cfg.finetune.task, task_spec(cfg), tok, train).featurize(train)]
    spe = steps_per_epoch(len(lengths), GLOBAL)
    shares = {}
    for grouped in (True, False):
        real = computed = 0
        batches = epoch_batches(0, len(lengths), GLOBAL, cfg.seed, lengths if grouped else None)
        for batch in batches[WARMUP:]:
            for rank in range(WORKERS):
                for ids in rank_micro_batches(batch, MICRO, WORKERS, rank, lengths if grouped else None):
                    rows = [lengths[i] for i in ids]
                    real += sum(rows)
                    computed += len(rows) * pad_width(rows, cfg.finetune.data.max_length)
        shares["grouped" if grouped else "shuffled"] = real / computed
    return shares, spe


def _write_config(root: Path, data: Path, task: str, grouped: bool, steps: int = 50) -> Path:
    path = root / f"{task}-{'grouped' if grouped else 'shuffled'}.yaml"
    path.write_text(config_text(data, root / "runs" / f"{task}-{grouped}", task, grouped, steps))
    return path


def _run(system: str, root: Path, data: Path, task: str, steps: int) -> float:
    """One run of `system` over `steps` (an epoch); its real tokens/s after the first WARMUP steps."""
    grouped = system in ("dist_train", "hf_trainer_grouped")
    config = _write_config(root, data, task, grouped, steps)
    shutil.rmtree(root / "runs", ignore_errors=True)
    if system.startswith("dist_train"):
        _checked("dist-train run", [str(BIN / "dist-train"), "run", str(config), "--stage", "finetune"],
                 env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        return json.loads((root / "runs" / f"{task}-{grouped}" / "finetune" / "result.json").read_text())[
            "tokens_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"config": str(config), "ds_config": HF_GUIDE_ZERO2, "micro": MICRO, "global_batch": GLOBAL,
                "steps": steps, "warmup": WARMUP, "warmup_steps": 2, "threads": 1, "lr": LR,
                "grouped": grouped, "out": f"{tmp}/result.json"}
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        _checked("hf_finetune.py", [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORKERS}",
                  f"--master-port={free_port()}", str(REPO / "bench" / "peers" / "hf_finetune.py"), f"{tmp}/spec.json"],
                 env=env, cwd=tmp)
        return json.loads(Path(f"{tmp}/result.json").read_text())["tokens_per_s"]


def _checked(what: str, cmd: list[str], **kw) -> None:
    """Run `cmd`; on failure, raise with the ends of its output (a benchmark never reports a failed run)."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def _print(task: str, r: dict) -> None:
    print(f"{task}: real tokens/s (median)")
    for system, v in r["median"].items():
        print(f"  {system:22} {v:8.0f}")
    for other, q in r["ratios"].items():
        goal = f"goal ≥ {q['goal']:.2f}: {q['verdict']}" if q["goal"] is not None else ""
        print(f"  dist_train ÷ {other:22} {q['value']:.2f} [{q['low']:.2f}, {q['high']:.2f}] {goal}")


LABELS = {"dist_train": "dist_train (length-grouped micro batches, the default)",
          "dist_train_ungrouped": "dist_train, `group_by_length: false` (plain shuffling, as before)",
          "hf_trainer": "HF `Trainer` + DeepSpeed, random sampler, padding collator",
          "hf_trainer_grouped": "HF `Trainer` + DeepSpeed, `train_sampling_strategy=\"group_by_length\"`"}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "## Fine-tuning against the peers (`python -m bench finetune`)", "",
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}. The same fine-tune for "
        f"every system: a Llama-style model (hidden {r['arch']['hidden_size']}, {r['arch']['num_layers']} layers, "
        f"vocab {VOCAB}) from a fixed random initialisation, the quickstart's examples tokenized by dist_train's task "
        f"(the same token ids), global batch {r['global_batch']} = {r['workers']} workers × micro batch "
        f"{r['micro_batch']} × 2 accumulation steps, ZeRO-2, bf16, one thread per worker, AdamW at the same learning "
        f"rate and schedule. HF Trainer runs the transformers guide's ZeRO-2 config (as in the throughput table). "
        "Each run trains one epoch (every example once); its figure is the real (non-pad) tokens per second "
        f"of the epoch's steps after the first {r['warmup_steps']} (a shorter window would favour a sampler "
        "that serves long examples first: HF's sorts each megabatch longest first, and a step of long examples "
        f"spends less of its time on fixed costs). Each system ran {r['repeats']} times, in alternating order; "
        "medians, "
        "and dist_train's ratio to each with a 95% bootstrap interval. A verdict is *met* only when the whole "
        "interval clears the goal. Shared, noisy 2-core machine: the ratios are what the runs show, not the "
        "absolute rates.", ""]
    for task, t in r["tasks"].items():
        name, _, max_length = TASKS[task]
        share = t["real_share"]
        lines += [f"### {task} (`{name}`, max_length {max_length}, {t['steps']} steps an epoch)", "",
                  "| system | real tokens/s (median) | runs |", "|---|---:|---|"]
        lines += [f"| {LABELS[s]} | {t['median'][s]:,.0f} | {', '.join(f'{v:,.0f}' for v in t['samples'][s])} |"
                  for s in SYSTEMS]
        lines += ["", "| dist_train ÷ | ratio [95% interval] | goal | verdict |", "|---|---:|---:|---|"]
        lines += [f"| {LABELS[o]} | {q['value']:.2f} [{q['low']:.2f}, {q['high']:.2f}] | "
                  + (f"≥ {q['goal']:.2f} | **{q['verdict']}** |" if q["goal"] is not None else "| what grouping buys |")
                  for o, q in t["ratios"].items()]
        lines += ["", f"Real tokens among the positions dist_train computes in the timed steps (from the workers' "
                  f"own pure plan): {share['grouped']:.0%} length-grouped, {share['shuffled']:.0%} shuffled.", ""]
    lines += ["Not measured here: the quality reached (one epoch from random weights says little about it); "
              "grouping changes which examples share a step, not which examples an epoch sees."]
    return "\n".join(lines)
