"""Stage `pretrain`: causal-LM continued pretraining on token shards (the parts run_stage needs)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dist_train.config.derived import StageDerived
from dist_train.config.schema import RunConfig
from dist_train.data.manifest import read_manifest
from dist_train.data.plan import PlanSpec
from dist_train.data.stream import pretrain_batches, validation_batches
from dist_train.model.build import build_causal_lm, load_tokenizer
from dist_train.train.loop import StepBatch
from dist_train.train.stage import StageParts
from dist_train.world import World


def lm_micro(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """A causal-LM micro batch: HF shifts labels inside the model."""
    ids = torch.from_numpy(rows.astype(np.int64))  # (B, T)
    return {"input_ids": ids, "labels": ids}


def plan_spec(cfg: RunConfig, man, d: StageDerived) -> PlanSpec:
    """The data plan of this run: fixed by the manifest and a few config integers."""
    return PlanSpec(sizes=tuple(s.samples for s in man.train), lanes=d.lanes, global_batch=d.global_batch_size,
                    seed=cfg.seed, window_shards=cfg.pretrain.data.window_shards)


def build_pretrain(cfg: RunConfig, d: StageDerived, world: World) -> StageParts:
    sec = cfg.pretrain
    man = read_manifest(sec.data.shards, allow_pipe=sec.data.allow_pipe)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    model = build_causal_lm(name_or_path=cfg.model.name_or_path, arch=cfg.model.arch, vocab_size=len(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, seed=cfg.seed,
                            gradient_checkpointing=sec.train.gradient_checkpointing)

    spec = plan_spec(cfg, man, d)
    spec.check(world.world_size)

    def batches(start_step: int) -> Iterator[StepBatch]:
        files = [s.file for s in man.train]
        for rows, ids, replaced in pretrain_batches(
                man, spec, world_size=world.world_size, rank=world.rank, start_step=start_step,
                loader_workers=sec.data.loader_workers, on_bad=sec.data.on_bad_sample,
                verify=sec.data.verify_checksums):
            micro = [lm_micro(rows[i:i + d.micro_batch_size]) for i in range(0, len(rows), d.micro_batch_size)]
            yield StepBatch(micro, tokens=int(rows.size), ids=[(files[s], k) for s, k in ids], replaced=replaced)

    def evaluate(engine: Any) -> dict[str, float]:
        engine.train(False)
        loss_tokens, tokens = 0.0, 0
        with torch.no_grad():
            for rows in validation_batches(man, micro_batch=d.micro_batch_size, world_size=world.world_size,
                                           rank=world.rank, max_batches=sec.train.eval_batches):
                n = rows.shape[0] * (rows.shape[1] - 1)  # predicted tokens: every position but the first
                loss_tokens += float(engine.forward(lm_micro(rows)).loss) * n
                tokens += n
        total, count = world.all_reduce_sum([loss_tokens, tokens])
        if count == 0:
            return {}
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}

    plan = {"lanes": spec.lanes, "window_shards": spec.window_shards, "seed": spec.seed,
            "global_batch": spec.global_batch, "shards": sec.data.shards}
    return StageParts(model=model, tokenizer=tokenizer, batches=batches, evaluate=evaluate,
                      final=lambda engine: {}, seq_len=man.seq_len, run_info={"plan": plan})
