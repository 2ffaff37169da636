"""Data-path benchmarks (issue: exact, elastic streaming), each measured side by side, medians of runs:

1. loader headroom: tokens/s one rank's loader delivers vs tokens/s one rank trains on (the
   quickstart model, measured in the same session), and the data-wait share of a training run;
2. build: `dist-train data build` tokens/s vs a baseline of HF `datasets.map` + `webdataset.TarWriter`
   on the same corpus and tokenizer;
3. resume: time from "resume at step k" to the first batch, at 10% and at 90% of an epoch.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def corpus(root: Path, copies: int = 4) -> tuple[Path, Path]:
    """The quickstart's corpus, repeated to a few MB, and its tokenizer (built offline)."""
    from dist_train.data.quickstart import prepare_python_docs

    data = prepare_python_docs(root / "qs", seq_len=128, vocab_size=4096, progress=False)
    lines = (data / "corpus.jsonl").read_text()
    big = root / "corpus.jsonl"
    big.write_text(lines * copies)
    return big, data / "tokenizer"


def baseline_build(jsonl: Path, tokenizer: Path, out: Path, seq_len: int) -> int:
    """What users write today: datasets.map(tokenize) then pack and write with webdataset.TarWriter."""
    import datasets
    import webdataset as wds

    from dist_train.model.build import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(str(tokenizer))
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", keep_in_memory=True)
    ds = ds.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]}, batched=True,
                remove_columns=["text"], keep_in_memory=True)
    out.mkdir(parents=True)
    buf: list[int] = []
    n = shard = 0
    sink = wds.TarWriter(str(out / "shard-000000.tar"))
    for row in ds:
        buf.extend(row["ids"])
        buf.append(tok.eos_token_id)
        while len(buf) >= seq_len:
            sink.write({"__key__": f"{n:07d}", "tokens.npy": np.asarray(buf[:seq_len], dtype=np.uint16)})
            del buf[:seq_len]
            n += 1
            if n % 1000 == 0:
                sink.close()
                shard += 1
                sink = wds.TarWriter(str(out / f"shard-{shard:06d}.tar"))
    sink.close()
    return n * seq_len


def bench_build(jsonl: Path, tokenizer: Path, root: Path, repeats: int) -> dict:
    from dist_train.data.build import build_shards

    tokens = {}

    def ours(workers: int):
        def go():
            out = root / f"ours{workers}"
            shutil.rmtree(out, ignore_errors=True)
            man = build_shards(input_spec=str(jsonl), output=out, tokenizer_name=str(tokenizer), seq_len=128,
                               samples_per_shard=1000, progress=False, workers=workers)
            tokens["ours"] = sum(s.tokens for s in man.train + man.validation)
        return go

    def base():
        out = root / "base"
        shutil.rmtree(out, ignore_errors=True)
        tokens["base"] = baseline_build(jsonl, tokenizer, out, 128)

    t_base = median_time(base, repeats)
    t_ours1 = median_time(ours(1), repeats)
    t_ours2 = median_time(ours(2), repeats)
    return {"baseline_tokens_per_s": tokens["base"] / t_base, "ours_1_worker_tokens_per_s": tokens["ours"] / t_ours1,
            "ours_2_workers_tokens_per_s": tokens["ours"] / t_ours2,
            "ratio_1_worker": (tokens["ours"] / t_ours1) / (tokens["base"] / t_base),
            "ratio_2_workers": (tokens["ours"] / t_ours2) / (tokens["base"] / t_base), "tokens": tokens["ours"]}


def bench_loader(shards: Path, repeats: int, global_batch: int = 16, lanes: int = 2, steps: int = 150) -> dict:
    """tokens/s one of 2 ranks' loaders delivers: the plan, shard reads and batching, no training."""
    from dist_train.data.manifest import read_manifest
    from dist_train.data.mixture import Mixture
    from dist_train.data.plan import PlanSpec
    from dist_train.data.stream import pretrain_batches

    man = read_manifest(shards)
    spec = PlanSpec(tuple(s.samples for s in man.train), lanes=lanes, global_batch=global_batch, seed=0)
    # default: 150 steps x 8 samples per rank, more than half of the quickstart corpus

    def go():
        for _ in islice(pretrain_batches([man], Mixture.of(spec), world_size=2, rank=0, start_step=0), steps):
            pass

    t = median_time(go, repeats)
    return {"loader_tokens_per_s_per_rank": steps * global_batch // 2 * man.seq_len / t}


def bench_resume(shards: Path, repeats: int) -> dict:
    from dist_train.data.manifest import read_manifest
    from dist_train.data.mixture import Mixture
    from dist_train.data.plan import PlanSpec, epoch_length
    from dist_train.data.stream import pretrain_batches

    man = read_manifest(shards)
    spec = PlanSpec(tuple(s.samples for s in man.train), lanes=2, global_batch=16, seed=0)
    steps_per_epoch = epoch_length(spec, 0) // spec.per_lane
    out = {}
    for frac in (0.1, 0.9):
        step = int(frac * steps_per_epoch)

        def first_batch(step=step):
            next(pretrain_batches([man], Mixture.of(spec), world_size=2, rank=0, start_step=step))

        out[f"resume_at_{int(frac * 100)}pct_s"] = median_time(first_batch, max(repeats, 5))
    out["resume_ratio_90_vs_10"] = out["resume_at_90pct_s"] / out["resume_at_10pct_s"]
    return out


def bench_training(root: Path) -> dict:
    """A short real pretrain run of the quickstart: per-rank training tokens/s and data wait."""
    cmd = [sys.executable, "-m", "dist_train.cli", "run", str(REPO / "configs" / "quickstart.yaml"),
           f"output_dir={root / 'run'}", f"prepare.dir={root / 'qs'}", f"model.tokenizer={root / 'qs' / 'tokenizer'}",
           f"pretrain.data.shards={root / 'qs' / 'shards'}", "finetune=null", "pretrain.train.max_steps=60",
           "pretrain.train.eval_every=0", "pretrain.train.save_every=0",
           "pretrain.deepspeed.precision=bf16"]  # as earlier figures (the quickstart itself takes auto)
    subprocess.run(cmd, check=True, capture_output=True)
    stage = json.loads((root / "run" / "report.json").read_text())["stages"]["pretrain"]
    return {"train_tokens_per_s_per_rank": stage["tokens_per_s"] / stage["world_size"],
            "train_data_wait_frac": stage["data_wait_frac"]}


def run(repeats: int = 3) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        jsonl, tokenizer = corpus(root)
        shards = root / "qs" / "shards"
        res = {**bench_loader(shards, repeats), **bench_training(root), **bench_resume(shards, repeats),
               **bench_build(jsonl, tokenizer, root, repeats)}
        res["loader_headroom"] = res["loader_tokens_per_s_per_rank"] / res["train_tokens_per_s_per_rank"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'measure':44} {'value':>14}")
    for key, value in res.items():
        print(f"{key:44} {value:>14.4g}")
    return res


def markdown(r: dict) -> str:
    m = r["machine"]
    rows = [
        ("loader tokens/s per rank (one rank's share of the quickstart plan)", r["loader_tokens_per_s_per_rank"], ""),
        ("training tokens/s per rank (quickstart pretrain, 2 workers, ZeRO-2 bf16)", r["train_tokens_per_s_per_rank"],
         ""),
        ("**loader headroom** (loader ÷ training)", r["loader_headroom"], "≥ 20×"),
        ("data wait fraction of step time in that run", f"{r['train_data_wait_frac']:.2%}", "≤ 1%"),
        ("build tokens/s, HF `datasets.map` + `webdataset.TarWriter` (baseline)", r["baseline_tokens_per_s"], ""),
        ("build tokens/s, `dist-train data build --workers 1`", r["ours_1_worker_tokens_per_s"], ""),
        ("build tokens/s, `dist-train data build --workers 2`", r["ours_2_workers_tokens_per_s"], ""),
        ("**build ratio** (ours ÷ baseline), 1 worker / 2 workers",
         f"{r['ratio_1_worker']:.2f}× / {r['ratio_2_workers']:.2f}×", "≥ 1.0×"),
        ("time to first batch resuming at 10% of an epoch (s)", r["resume_at_10pct_s"], ""),
        ("time to first batch resuming at 90% of an epoch (s)", r["resume_at_90pct_s"], ""),
        ("**resume ratio** 90% ÷ 10%", r["resume_ratio_90_vs_10"], "within 1 ± 0.2"),
    ]
    lines = ["## Data path (`python -m bench data`)", "",
             f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores), {m['platform']}, torch {m['torch']}. "
             "Shared, noisy machine: each figure is the median of repeated runs, and ratios compare runs made "
             "side by side in one session. Corpus: the quickstart's Python documentation, repeated 4× for the "
             f"build ({r['tokens']:.0f} tokens), 128-token samples, a 4096-token BPE tokenizer.", "",
             "| measure | value | goal |", "|---|---:|---|"]
    for name, value, goal in rows:
        shown = value if isinstance(value, str) else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
        lines.append(f"| {name} | {shown} | {goal} |")
    return "\n".join(lines)
