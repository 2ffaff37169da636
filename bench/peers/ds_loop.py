"""The floor: a plain `torchrun` + DeepSpeed training loop over the same rows, model and DeepSpeed config.

    torchrun --nproc-per-node 2 bench/peers/ds_loop.py SPEC.json

No Ray, no data plan, no ledger, no heartbeat, no checkpoints: what dist_train's layers add is the
difference between its tokens/s and this one's.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.peers.common import StepTimer, load_spec, token_rows


def main() -> None:
    spec = load_spec(sys.argv)
    torch.set_num_threads(spec["threads"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model_config"]))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=spec["ds_config"])
    rows = torch.from_numpy(token_rows(spec["shards"]))
    micro = spec["micro"]
    timer = StepTimer(spec["warmup"])
    for step in range(spec["steps"]):
        timer.start()
        start = (step * world + rank) * micro
        ids = rows[start:start + micro]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        timer.stop(ids.numel())
    timer.write(spec, final_loss=float(loss), params=sum(p.numel() for p in model.parameters()))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
