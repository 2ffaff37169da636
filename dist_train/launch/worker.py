"""The Ray Train worker entry. Its only input is the plain dict it receives: no driver globals.

It rebuilds the typed config, builds the `World` from Ray Train's context (the one place the
topology is read), and runs the requested stage.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.safe_load import allow_deepspeed_checkpoints
from dist_train.config.derived import derive_stage
from dist_train.config.loader import from_dict
from dist_train.deepspeed_import import import_deepspeed
from dist_train.train.heartbeat import Heartbeat, record_incident
from dist_train.world import World


def world_from_ray(use_gpu: bool) -> World:
    import ray
    import ray.train

    ctx = ray.train.get_context()
    device = "cpu"
    if use_gpu and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"  # Ray Train has set this worker's GPU
    return World(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank(),
                 local_world_size=ctx.get_local_world_size(), node_rank=ctx.get_node_rank(), device=device,
                 node=ray.get_runtime_context().get_node_id())


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user (deprecations, load reports, bars)."""
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import_deepspeed()
    from deepspeed.utils import logger as ds_logger  # importing deepspeed resets its level: set it after

    ds_logger.setLevel(logging.ERROR)


def train_worker(payload: dict[str, Any]) -> None:
    """Run one stage on this worker. payload = {"config": resolved config dict, "stage": name,
    "attempt": the driver's id of this start (its clock, the same on every rank)}."""
    from dist_train.train.finetune import build_finetune
    from dist_train.train.pretrain import build_pretrain
    from dist_train.train.stage import run_stage

    started = time.time()
    quiet_libraries()
    allow_deepspeed_checkpoints()
    cfg = from_dict(payload["config"])
    stage = payload["stage"]
    stage_dir = Path(cfg.output_dir) / stage
    world = world_from_ray(cfg.ray.use_gpu)
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    attempt = float(payload["attempt"]) if "attempt" in payload else world.broadcast_object(time.time())
    heartbeat = Heartbeat(stage_dir, world, attempt, cfg.ray.heartbeat_timeout_s)
    try:
        heartbeat.start()
        d = derive_stage(cfg, stage, world.world_size)
        build = {"pretrain": build_pretrain, "finetune": build_finetune}[stage]
        run_stage(cfg, stage, d, world, build(cfg, d, world), attempt=attempt, heartbeat=heartbeat, started=started)
    except Exception as e:
        error = e
        if isinstance(e, RuntimeError) and is_collective_timeout(e):
            error = RuntimeError(f"a collective waited longer than ray.collective_timeout_s="
                                 f"{cfg.ray.collective_timeout_s} s in {heartbeat.phase} at step {heartbeat.step}; "
                                 f"{heartbeat.others_behind()}. Raise the timeout if one rank legitimately works "
                                 "alone that long")
        # The driver reads this to say why the attempt ended, and to tell an error that a restart would
        # repeat (the same one at the same step) from one it may not.
        record_incident(stage_dir, "error", f"rank {world.rank}: {first_line(error)}", rank=world.rank,
                        step=heartbeat.step, phase=heartbeat.phase, attempt=attempt, error=type(error).__name__,
                        traceback=save_traceback(stage_dir, attempt, world.rank))
        if error is e:
            raise
        raise error from e
    finally:
        heartbeat.stop()


def save_traceback(stage_dir: Path, attempt: float, rank: int) -> str | None:
    """The exception being handled, written whole to <stage>/tracebacks/ (a file per rank and attempt: no
    rank's long write interleaves with another's); its path relative to the stage, or None."""
    name = f"tracebacks/attempt_{attempt:.6f}.rank_{rank:05d}.txt"
    try:
        (stage_dir / "tracebacks").mkdir(parents=True, exist_ok=True)
        (stage_dir / name).write_text(traceback.format_exc())
    except OSError:
        return None
    return name


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def is_collective_timeout(e: BaseException) -> bool:
    """gloo and NCCL phrase a timed-out collective differently; both mean a peer never arrived."""
    text = str(e)
    return "Timed out waiting" in text or "Watchdog caught collective operation timeout" in text
