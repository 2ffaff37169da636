"""Stage `pretrain`: causal- or masked-LM continued pretraining on token shards (the parts run_stage needs)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from dist_train.config.derived import StageDerived
from dist_train.config.schema import RunConfig, baseline_on
from dist_train.data.evalsets import (
    EvalSource,
    check_fits,
    eval_sources,
    read_samples,
    set_size,
    shard_source,
    usable,
)
from dist_train.data.manifest import DataError, Manifest, read_manifest
from dist_train.data.mixture import Mixture, shard_name
from dist_train.data.stream import pretrain_batches
from dist_train.data.tasks import eval_shard
from dist_train.model.build import build_lm, load_tokenizer
from dist_train.progress import Progress
from dist_train.tasks.metrics import perplexity
from dist_train.train.engine import model_construction
from dist_train.train.loop import StepBatch
from dist_train.train.loss import loss_for
from dist_train.train.masking import mask_batch, word_starts_table
from dist_train.train.stage import StageParts, attention_for, checkpointing_for
from dist_train.world import World

EVAL_SEED = 1 << 40  # a "step" no training step reaches: evaluation masks never repeat training ones


def lm_micro(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """A causal-LM micro batch: HF shifts labels inside the model."""
    ids = torch.from_numpy(rows.astype(np.int64))  # (B, T)
    return {"input_ids": ids, "labels": ids}


def count_targets(batch: dict[str, torch.Tensor], objective: str) -> int:
    """Predicted tokens of an LM batch: every position but the first (clm: HF shifts the labels
    by one), the chosen positions (mlm); labels of -100 never count."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if objective == "clm" else int((labels != -100).sum())


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
    checkpointing = checkpointing_for(cfg, "pretrain", world)
    attention = attention_for(cfg, "pretrain", world)
    with model_construction(d.deepspeed):
        model, loaded = build_lm(objective=sec.objective, name_or_path=cfg.model.name_or_path, arch=cfg.model.arch,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, seed=cfg.seed,
                         gradient_checkpointing=checkpointing, dropout=cfg.model.dropout,
                         attention=attention,
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
            # a packed sample attends over its whole length (documents are not masked from each other)
            # a causal LM predicts every position of every packed row but the first: the same count on every rank
            yield StepBatch(micro, targets=[count_targets(b, sec.objective) for b in micro], tokens=int(rows.size),
                            attention_units=int(rows.shape[0]) * int(rows.shape[1]) ** 2, ids=named, replaced=replaced,
                            uniform_targets=sec.objective == "clm")

    sets = read_eval_sets(cfg, man)
    evaluate = make_evaluate(sets, to_batch, loss_fn, sec.objective, world, d.micro_batch_size, cfg.seed,
                             sec.eval.samples)

    plan = {"lanes": mix.lanes, "window_shards": sec.data.window_shards, "seed": cfg.seed,
            "global_batch": mix.global_batch, "shards": sec.data.shards,
            "mix": [{"shards": m.shards, "weight": m.weight} for m in sec.data.mix],
            "corpora": [{"root": m.root, "samples": sum(s.samples for s in m.train), "documents": m.documents,
                         "manifest_sha256": m.sha256} for m in mans]}
    return StageParts(model=model, tokenizer=tokenizer, batches=batches, evaluate=evaluate,
                      final=lambda export_dir: {}, loss_fn=loss_fn, run_info={"plan": plan},
                      checkpointing=checkpointing,
                      loaded=loaded, eval_roles={s.name: s.role for s, _ in sets}, baseline=baseline_on(cfg),
                      max_forgetting=sec.eval.max_forgetting, stop_on_forgetting=sec.eval.stop_on_forgetting,
                      carry_unused=True)


def read_eval_sets(cfg: RunConfig, main: Manifest) -> list[tuple[EvalSource, Manifest]]:
    """Every evaluation set with its manifest (text corpora were packed by the driver at start); a corpus
    the run trains on without a validation split is left out (validate says so)."""
    out = []
    for s in eval_sources(cfg):
        man = read_manifest(shard_source(s, cfg.output_dir), allow_pipe=cfg.pretrain.data.allow_pipe)
        if usable(s, man):
            check_fits(s.name, man, main)
            out.append((s, man))
    return out


def make_evaluate(sets: list[tuple[EvalSource, Manifest]], to_batch: Callable, loss_fn: Callable, objective: str,
                  world: World, micro: int, seed: int, limit: int) -> Callable[[Any], dict[str, float]]:
    """engine -> per-set loss, perplexity and tokens ("<set>/loss", ...), and the domain sets pooled
    ("loss", "perplexity", "tokens") and the general ones ("general_loss", "general_perplexity").

    Each set's samples are its first `limit`; rank r evaluates every world_size-th of them (padded to
    equal counts with rows that weigh 0, so every rank runs the same forwards). A sample's mlm mask is
    seeded by (seed, set, index): the figures are the same at every evaluation and on any worker count."""
    plans = []
    for s, man in sets:
        size = set_size(man, limit)
        share = eval_shard(size, world.world_size, world.rank)
        plans.append((s, man, size, share, zlib.crc32(s.name.encode())))

    def evaluate(engine: Any) -> dict[str, float]:
        engine.train(False)
        sums: list[float] = []
        with torch.no_grad(), Progress("[pretrain] eval", total=sum(-(-len(p[3]) // micro) for p in plans),
                                       unit="batches", enabled=world.is_main) as bar:
            for _, man, size, share, key in plans:
                # the share's samples in index order (padding last), streamed: a set of any size fits
                stream = (row for _, row in read_samples(man, {i for i, w in share if w}, size))
                pad = np.zeros(man.seq_len, dtype=np.int64)
                loss_tokens, tokens = 0.0, 0
                for j in range(0, len(share), micro):
                    bar.update()
                    part = share[j:j + micro]
                    batch = to_batch(np.stack([next(stream) if w else pad for _, w in part]).astype(np.int64),
                                     [(seed, EVAL_SEED, key, i) for i, _ in part])
                    labels = batch.pop("labels").clone()  # clm: the same tensor as input_ids
                    labels[torch.tensor([w == 0 for _, w in part])] = -100  # padding rows weigh 0
                    loss_tokens += float(engine.loss({**batch, "labels": labels}, loss_fn))
                    tokens += count_targets({"labels": labels}, objective)
                sums += [loss_tokens, tokens]
        totals = world.all_reduce_sum(sums)
        return pooled_metrics({s.name: (totals[2 * k], totals[2 * k + 1]) for k, (s, *_) in enumerate(plans)},
                              {s.name: s.role for s, *_ in plans})

    return evaluate


def pooled_metrics(sums: dict[str, tuple[float, float]], roles: dict[str, str]) -> dict[str, float]:
    """Metrics from each set's (summed loss, target tokens): per set, and pooled by role (token-weighted)."""
    out: dict[str, float] = {}
    pools: dict[str, list[float]] = {"domain": [0.0, 0.0], "general": [0.0, 0.0]}
    for name, (loss_sum, count) in sums.items():
        if count:
            out.update({f"{name}/loss": loss_sum / count, f"{name}/perplexity": perplexity(loss_sum / count),
                        f"{name}/tokens": count})
        pools[roles[name]][0] += loss_sum
        pools[roles[name]][1] += count
    for role, prefix in (("domain", ""), ("general", "general_")):
        loss_sum, count = pools[role]
        if count:
            out.update({f"{prefix}loss": loss_sum / count, f"{prefix}perplexity": perplexity(loss_sum / count)})
            if role == "domain":
                out["tokens"] = count
    return out
