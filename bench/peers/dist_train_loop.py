"""dist_train's own worker body (build, data plan, loop, ledger, heartbeat, export) under `torchrun`
instead of Ray Train: separates what the loop layers cost from what the Ray processes cost.

    torchrun --nproc-per-node 2 bench/peers/dist_train_loop.py SPEC.json   (spec["config"]: a run config;
                                                                             spec["stage"]: pretrain or finetune)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.peers.common import load_spec
from dist_train.checkpoint.safe_load import allow_deepspeed_checkpoints
from dist_train.config.derived import derive_stage
from dist_train.config.loader import load_config
from dist_train.launch.worker import quiet_libraries
from dist_train.train.finetune import build_finetune
from dist_train.train.heartbeat import Heartbeat
from dist_train.train.pretrain import build_pretrain
from dist_train.train.stage import run_stage
from dist_train.world import World


def main() -> None:
    spec = load_spec(sys.argv)
    quiet_libraries()
    allow_deepspeed_checkpoints()
    cfg = load_config(spec["config"])
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    torch.distributed.init_process_group("gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    world = World(rank=rank, world_size=world_size, local_rank=int(os.environ["LOCAL_RANK"]),
                  local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]))
    attempt = world.broadcast_object(time.time())
    stage = spec.get("stage", "pretrain")
    build = build_finetune if stage == "finetune" else build_pretrain
    heartbeat = Heartbeat(Path(cfg.output_dir) / stage, world, attempt, cfg.ray.heartbeat_timeout_s).start()
    try:
        d = derive_stage(cfg, stage, world_size)
        result = run_stage(cfg, stage, d, world, build(cfg, d, world), attempt=attempt, heartbeat=heartbeat)
    finally:
        heartbeat.stop()
    if world.is_main:
        Path(spec["out"]).write_text(json.dumps({"tokens_per_s": result["tokens_per_s"], "mfu": result["mfu"]}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
