"""What both peer scripts share: the spec they read, the token rows they train on, the timing they report."""

from __future__ import annotations

import json
import os
import tarfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np


def load_spec(argv: list[str]) -> dict:
    """The benchmark's spec: {"model_config", "ds_config", "shards", "micro", "steps", "warmup",
    "threads", "lr", "out"} (see bench/throughput.py)."""
    return json.loads(Path(argv[1]).read_text())


def token_rows(shards: str) -> np.ndarray:
    """Every training row of a dist_train shard directory, in shard order: (rows, seq_len) int64.
    The same packed samples dist_train trains on; the peers only differ in how they feed them."""
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    rows = []
    for shard in manifest["train"]:
        with tarfile.open(Path(shards) / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".tokens.npy"):
                    rows.append(np.load(BytesIO(tar.extractfile(member).read())))
    return np.stack(rows).astype(np.int64)


class StepTimer:
    """Steady-state tokens/s: the summed wall time of the steps after `warmup`, as dist_train counts it."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.seconds, self.tokens, self._t0 = warmup, 0, 0.0, 0, 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += tokens

    def write(self, spec: dict, **extra) -> None:
        """Rank 0 writes {"tokens_per_s", "steps", ...} to spec["out"]."""
        if int(os.environ.get("RANK", "0")) == 0:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            result = {"tokens_per_s": self.tokens * world / self.seconds, "measured_steps": self.steps - self.warmup,
                      **extra}
            Path(spec["out"]).write_text(json.dumps(result))
