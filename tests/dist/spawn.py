"""Start the ranks of a 2-process test from a fork server that has imported torch, transformers and
DeepSpeed once, instead of a fresh interpreter per rank that imports them again (about 5 s of CPU a
rank, on a 2-core machine where every test starts two).

The fork server starts on the first call and serves the whole session. Its children write to the
stdout it had when it started, not to a test's capfd: a test that reads what its ranks print passes
fresh=True (plain spawn).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

# What every rank imports before its test body runs; tests.dist.preload imports the heavy part.
PRELOAD = ["tests.dist.preload"]


def spawn(fn: Callable[..., Any], args: tuple, nprocs: int, fresh: bool = False) -> None:
    """Run fn(rank, *args) in `nprocs` processes and wait for all of them; raises as
    torch.multiprocessing.spawn does when a rank fails or dies."""
    import torch.multiprocessing as mp

    if fresh:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
        return
    multiprocessing.set_forkserver_preload(PRELOAD)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
