"""The explicit topology object. Built once in the worker entry and passed down.

Nothing below the launch layer reads RANK or WORLD_SIZE from the environment; everything that
needs to know who it is takes a `World`. Collectives used by the training code live here too,
so the single-process case (world_size 1) needs no process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """Rank and size of this training process.

    The counts are global (all nodes), not to be confused with data-loader worker counts.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    device: str = "cpu"  # where collectives put their tensors: "cuda" under NCCL
    node: str | None = None  # the cluster's id of this rank's node (Ray node id); host names may repeat

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 so token counts stay exact."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj: object) -> object:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
