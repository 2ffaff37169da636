"""Mixtures: several corpora interleaved in every lane by fixed shares. Pure functions only.

Each source has its own plan (data/plan.py: shards, lanes, windows, epochs) over the same
number of lanes. Position p of a lane is drawn from source i when source i's pick count
c_i(p + 1) exceeds c_i(p), where the counts split p by the weights with nested floors:
c_0(p) = ⌊w_0·p⌋, c_1(p) = ⌊w_1/(1−w_0) · (p − c_0(p))⌋, … and the last source takes the rest.
The counts are exact integers (weights as fractions), sum to p, stay within one sample of
w_i·p, and cost O(sources) to compute at any position: resuming a mixture is O(1) too. A
single corpus is the mixture of one source.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from dist_train.data.plan import PlanSpec, lane_samples, rank_lanes


@dataclass(frozen=True)
class Mixture:
    sources: tuple[PlanSpec, ...]  # one plan per corpus, the main corpus first
    weights: tuple[Fraction, ...]  # shares, summing to 1

    @staticmethod
    def of(spec: PlanSpec) -> Mixture:
        return Mixture((spec,), (Fraction(1),))

    @staticmethod
    def build(mans: list, *, lanes: int, global_batch: int, seed: int, window_shards: int,
              mix_weights: tuple[float, ...]) -> Mixture:
        """The plan of a run over manifests (main corpus first): corpus i is shuffled with seed + i."""
        specs = tuple(PlanSpec(tuple(s.samples for s in m.train), lanes, global_batch, seed + i, window_shards)
                      for i, m in enumerate(mans))
        return Mixture.weighted(specs, mix_weights)

    @staticmethod
    def weighted(sources: tuple[PlanSpec, ...], mix_weights: tuple[float, ...]) -> Mixture:
        """The main corpus (sources[0]) gets 1 - sum(mix_weights)."""
        extra = tuple(Fraction(w).limit_denominator(10**6) for w in mix_weights)
        return Mixture(sources, (1 - sum(extra), *extra))

    @property
    def lanes(self) -> int:
        return self.sources[0].lanes

    @property
    def global_batch(self) -> int:
        return self.sources[0].global_batch

    @property
    def per_lane(self) -> int:
        return self.sources[0].per_lane

    def check(self, world_size: int | None = None) -> None:
        from dist_train.data.manifest import DataError

        if self.weights[0] <= 0:
            raise DataError(f"pretrain.data.mix weights sum to {float(1 - self.weights[0]):.3g}: they must leave "
                            "a share (> 0) for the main corpus")
        for spec in self.sources:
            spec.check(world_size)


def counts(weights: tuple[Fraction, ...], p: int) -> tuple[int, ...]:
    """How many of the lane positions [0, p) each source fills."""
    out, rest, left = [], p, Fraction(1)
    for w in weights[:-1]:
        c = int(rest * w / left) if left > 0 else 0  # floor, exactly
        out.append(c)
        rest, left = rest - c, left - w
    return (*out, rest)


def source_runs(mix: Mixture, p: int, k: int) -> list[tuple[int, int]]:
    """(source, source-lane position) of lane positions [p, p + k), in order."""
    out, before = [], counts(mix.weights, p)
    for pos in range(p, p + k):
        after = counts(mix.weights, pos + 1)
        src = next(i for i in range(len(after)) if after[i] > before[i])
        out.append((src, before[src]))
        before = after
    return out


def rank_step_ids(mix: Mixture, step: int, world_size: int, rank: int) -> list[tuple[int, int, int]]:
    """The (source, shard, sample) ids rank `rank` trains on at `step`, in batch order."""
    runs: list[list[int]] = []  # [source, first position, count]: consecutive positions of one source
    for src, q in source_runs(mix, step * mix.per_lane, mix.per_lane):
        if runs and runs[-1][0] == src and runs[-1][1] + runs[-1][2] == q:
            runs[-1][2] += 1
        else:
            runs.append([src, q, 1])
    return [(src, shard, k) for lane in rank_lanes(mix.lanes, world_size, rank) for src, q, n in runs
            for shard, k in lane_samples(mix.sources[src], lane, q, n)]


def shard_name(files: list[list[str]], src: int, shard: int) -> str:
    """A shard's name in plans and ledgers: its file, prefixed `mix1/`, `mix2/`, ... for the
    mixed-in corpora."""
    return f"{'' if src == 0 else f'mix{src}/'}{files[src][shard]}"


def label(files: list[list[str]], src: int, shard: int, k: int) -> str:
    """A sample's name as `data plan` and the ledger print it: `shard-000003.tar:17`."""
    return f"{shard_name(files, src, shard)}:{k}"
