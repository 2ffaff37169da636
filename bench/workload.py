"""The benchmark workload every throughput figure uses, and the runners that measure it.

A ~30M-parameter Llama-style model (hidden 512, 8 layers, 8 heads, vocab 8192, tied embeddings)
at sequence length 256, trained with causal LM on the quickstart corpus (Python's own docs),
ZeRO-2, bf16, micro batch 4 per worker, one thread per worker. Each system runs it as its users
would, and reports steady-state tokens/s: the steps after the first two, summed step times.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARCH = {"family": "llama", "hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1408,
        "max_position_embeddings": 512}
SEQ, VOCAB, MICRO, STEPS, WARMUP = 256, 8192, 4, 8, 2


def pretrain_config(*, data: Path, out: Path, arch: dict, seq: int, micro: int, workers: int, steps: int, lr: float,
                    use_gpu: bool = False, cpus_per_worker: int = 1, checkpointing: bool = False,
                    log_every: int = 10, prepare_vocab: int | None = None) -> str:
    """A pretrain-only dist_train config as YAML text: no evaluation or checkpoint inside the timed
    steps. `prepare_vocab` adds the quickstart's prepare block (a no-op once `data` is built)."""
    arch_text = ", ".join(f"{k}: {v}" for k, v in arch.items())
    prepare = (f"prepare: {{builtin: python_docs, dir: {data}, seq_len: {seq}, vocab_size: {prepare_vocab}}}\n"
               if prepare_vocab else "")
    return f"""
output_dir: {out}
seed: 0
{prepare}ray: {{num_workers: {workers}, use_gpu: {str(use_gpu).lower()}, cpus_per_worker: {cpus_per_worker}}}
model:
  tokenizer: {data}/tokenizer
  arch: {{{arch_text}}}
pretrain:
  objective: clm
  data: {{shards: {data}/shards, seq_len: {seq}}}
  deepspeed: {{zero_stage: 2, precision: bf16}}
  optim: {{lr: {lr}, warmup_steps: 2}}
  train: {{max_steps: {steps}, global_batch_size: {micro * workers}, micro_batch_size: {micro}, log_every: {log_every},
          gradient_checkpointing: {str(checkpointing).lower()}, eval_every: 0, save_every: 0}}
  eval: {{samples: {micro * workers}}}
"""


def config_text(data_dir: Path, out_dir: Path, workers: int = 2, steps: int = STEPS) -> str:
    """dist_train's config for the workload."""
    return pretrain_config(data=data_dir, out=out_dir, arch=ARCH, seq=SEQ, micro=MICRO, workers=workers, steps=steps,
                           lr=1.0e-3, log_every=WARMUP, prepare_vocab=VOCAB)


class Workload:
    """The prepared data, the model's HF config and the DeepSpeed config dist_train renders for it."""

    def __init__(self, root: Path) -> None:
        from dist_train.data.quickstart import prepare_python_docs

        self.root = root
        self.data = prepare_python_docs(root / "data", seq_len=SEQ, vocab_size=VOCAB, progress=False)
        self.config = self.write_config(2)
        self.model_config = root / "model"
        self.model_config.mkdir(exist_ok=True)
        self.hf_config().save_pretrained(self.model_config)

    def write_config(self, workers: int, steps: int = STEPS) -> Path:
        path = self.root / f"bench-{workers}w.yaml"
        path.write_text(config_text(self.data, self.root / "runs" / f"{workers}w", workers, steps))
        return path

    def cfg(self, workers: int = 2):
        from dist_train.config.loader import load_config

        return load_config(self.write_config(workers))

    def hf_config(self):
        from dist_train.model.build import arch_config, load_tokenizer

        cfg = self.cfg()
        tok = load_tokenizer(cfg.model.tokenizer)
        return arch_config(cfg.model.arch, len(tok), tok.pad_token_id, tok.eos_token_id)

    def deepspeed(self, workers: int = 2) -> dict:
        from dist_train.config.derived import derive_stage

        return derive_stage(self.cfg(workers), "pretrain", workers).deepspeed

    def run_dist_train(self, workers: int = 2, overrides: tuple[str, ...] = ()) -> dict:
        """`dist-train run` of the workload (Ray, DeepSpeed, the data plan, ledger, heartbeat and all);
        returns the stage's result.json."""
        config = self.write_config(workers)
        out = self.root / "runs" / f"{workers}w"
        shutil.rmtree(out, ignore_errors=True)
        res = subprocess.run([str(BIN / "dist-train"), "run", str(config), *overrides], capture_output=True,
                             text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        if res.returncode != 0:
            raise RuntimeError(f"dist-train run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return json.loads((out / "pretrain" / "result.json").read_text())

    def run_peer(self, script: str, ds_config: dict | None = None, workers: int = 2) -> dict:
        """One peer script under torchrun, on the same rows, model, batch and DeepSpeed settings."""
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"model_config": str(self.model_config), "ds_config": ds_config, "shards": str(self.data / "shards"),
                    "micro": MICRO, "steps": STEPS, "warmup": WARMUP, "threads": 1, "lr": 1e-3,
                    "config": str(self.write_config(workers)), "out": f"{tmp}/result.json"}
            shutil.rmtree(self.root / "runs" / f"{workers}w", ignore_errors=True)
            Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
            port = free_port()
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}",
                                  f"--master-port={port}", str(REPO / "bench" / "peers" / script),
                                  f"{tmp}/spec.json"], capture_output=True, text=True, env=env, cwd=tmp)
            if res.returncode != 0:
                raise RuntimeError(f"{script} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            return json.loads(Path(f"{tmp}/result.json").read_text())


# The ZeRO-2 example of the transformers DeepSpeed guide (docs/source/en/deepspeed.md), without its CPU
# offload (the comparison keeps the optimizer on the workers); Trainer fills the "auto" values.
HF_GUIDE_ZERO2 = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                          "contiguous_gradients": True, "round_robin_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
