"""Stage `pretrain`: causal- or masked-LM continued pretraining on token shards (the parts run_stage needs)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dist_train.config.derived import StageDerived
from dist_train.config.schema import RunConfig
from dist_train.data.manifest import DataError, Manifest, read_manifest
from dist_train.data.mixture import Mixture, shard_name
from dist_train.data.stream import pretrain_batches, validation_batches
from dist_train.model.build import build_lm, load_tokenizer
from dist_train.progress import Progress
from dist_train.train.engine import model_construction
from dist_train.train.loop import StepBatch
from dist_train.train.loss import loss_for
from dist_train.train.masking import mask_batch, word_starts_table
from dist_train.train.stage import StageParts
from dist_train.world import World

EVAL_SEED = 1 << 40  # a "step" no training step reaches: evaluation masks never repeat training ones


def lm_micro(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """A causal-LM micro batch: HF shifts labels inside the model."""
    ids = torch.from_numpy(rows.astype(np.int64))  # (B, T)
    return {"input_ids": ids, "labels": ids}


def count_targets(batch: dict[str, torch.Tensor], objective: str) -> int:
    """Predicted tokens of an LM batch: every position but the first (clm: HF shifts the labels
    by one), the chosen positions (mlm)."""
    labels = batch["labels"]
    return int(labels[:, 1:].numel()) if objective == "clm" else int((labels != -100).sum())


def make_micro(cfg: RunConfig, tokenizer: Any):
    """rows (B, T) and per-row mask seeds -> a model batch for the configured objective."""
    sec = cfg.pretrain
    if sec.objective == "clm":
        return lambda rows, seeds: lm_micro(rows)
    if tokenizer.mask_token_id is None:
        raise DataError(f"pretrain.objective=mlm needs a tokenizer with a mask token; {tokenizer.name_or_path!r} "
                        "has none: use clm or an encoder's tokenizer")
    special = np.array(sorted(set(tokenizer.all_special_ids)))
    starts = word_starts_table(tokenizer) if sec.whole_word_masking else None

    def micro(rows: np.ndarray, seeds: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        ids, labels = mask_batch(rows, seeds, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                 special_ids=special, probability=sec.mlm_probability, word_starts=starts)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}  # (B, T) each

    return micro


def read_sources(cfg: RunConfig) -> list[Manifest]:
    """The manifests of the main corpus and of every mixed-in corpus, checked to fit together."""
    data = cfg.pretrain.data
    mans = [read_manifest(src, allow_pipe=data.allow_pipe) for src in (data.shards, *(m.shards for m in data.mix))]
    for m, src in zip(mans[1:], data.mix, strict=True):
        if m.seq_len != mans[0].seq_len or m.tokenizer["sha256"] != mans[0].tokenizer["sha256"]:
            raise DataError(f"mixed-in corpus {src.shards} was built with another tokenizer or seq_len than "
                            f"{data.shards}: rebuild it with the main tokenizer and --seq-len {mans[0].seq_len}")
    return mans


def plan_of(cfg: RunConfig, mans: list[Manifest], d: StageDerived) -> Mixture:
    """The data plan of this run: fixed by the manifests and a few config integers."""
    data = cfg.pretrain.data
    return Mixture.build(mans, lanes=d.lanes, global_batch=d.global_batch_size, seed=cfg.seed,
                         window_shards=data.window_shards, mix_weights=tuple(m.weight for m in data.mix))


def build_pretrain(cfg: RunConfig, d: StageDerived, world: World) -> StageParts:
    sec = cfg.pretrain
    mans = read_sources(cfg)
    man = mans[0]
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
    with model_construction(d.deepspeed):
        model = build_lm(objective=sec.objective, name_or_path=cfg.model.name_or_path, arch=cfg.model.arch,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, seed=cfg.seed,
                         gradient_checkpointing=sec.train.gradient_checkpointing, dropout=cfg.model.dropout,
                         trust_remote_code=cfg.model.trust_remote_code)
    to_batch = make_micro(cfg, tokenizer)
    loss_fn = loss_for(sec.objective)
    first_row = world.rank * d.samples_per_rank  # this rank's offset in the global batch

    mix = plan_of(cfg, mans, d)
    mix.check(world.world_size)
    files = [[s.file for s in m.train] for m in mans]

    def batches(start_step: int) -> Iterator[StepBatch]:
        for step, (rows, ids, replaced) in enumerate(pretrain_batches(
                mans, mix, world_size=world.world_size, rank=world.rank, start_step=start_step,
                loader_workers=sec.data.loader_workers, on_bad=sec.data.on_bad_sample,
                verify=sec.data.verify_checksums), start=start_step):
            # masks are seeded by the sample's place in the global batch: the same on any worker count
            seeds = [(cfg.seed, step, first_row + j) for j in range(len(rows))]
            m = d.micro_batch_size
            micro = [to_batch(rows[i:i + m], seeds[i:i + m]) for i in range(0, len(rows), m)]
            named = [(shard_name(files, src, shard), k) for src, shard, k in ids]
            yield StepBatch(micro, targets=[count_targets(b, sec.objective) for b in micro], tokens=int(rows.size),
                            ids=named, replaced=replaced)

    def evaluate(engine: Any) -> dict[str, float]:
        engine.train(False)
        loss_tokens, tokens = 0.0, 0
        with torch.no_grad(), Progress("[pretrain] eval", unit="batches", enabled=world.is_main) as bar:
            for b, rows in enumerate(validation_batches(man, micro_batch=d.micro_batch_size,
                                                        world_size=world.world_size, rank=world.rank,
                                                        max_batches=sec.train.eval_batches)):
                bar.update()
                # the same masks at every evaluation, so the losses compare
                batch = to_batch(rows, [(cfg.seed, EVAL_SEED, world.rank, b, j) for j in range(len(rows))])
                labels = batch.pop("labels")
                loss_tokens += float(loss_fn(engine.forward(batch).logits, labels.to(engine.ds.device)))
                tokens += count_targets({"labels": labels}, sec.objective)
        total, count = world.all_reduce_sum([loss_tokens, tokens])
        if count == 0:
            return {}
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}

    plan = {"lanes": mix.lanes, "window_shards": sec.data.window_shards, "seed": cfg.seed,
            "global_batch": mix.global_batch, "shards": sec.data.shards,
            "mix": [{"shards": m.shards, "weight": m.weight} for m in sec.data.mix]}
    return StageParts(model=model, tokenizer=tokenizer, batches=batches, evaluate=evaluate,
                      final=lambda export_dir: {}, loss_fn=loss_fn, seq_len=man.seq_len, run_info={"plan": plan})
