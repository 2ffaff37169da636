"""Bodies of the 2-process tests (importable, so torch.multiprocessing can spawn them)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def init_process(rank: int, world_size: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    from dist_train.checkpoint.safe_load import allow_deepspeed_checkpoints

    allow_deepspeed_checkpoints()  # as in the Ray workers: every torch.load is weights_only
    from dist_train.world import World

    return World(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)


def build(cfg_dict, world, start_step=0):
    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import from_dict
    from dist_train.train.engine import build_engine
    from dist_train.train.pretrain import build_pretrain

    cfg = from_dict(cfg_dict)
    d = derive_stage(cfg, "pretrain", world.world_size)
    parts = build_pretrain(cfg, d, world)
    engine = build_engine(parts.model, d.deepspeed, cfg.pretrain.optim.weight_decay,
                          chunked_loss=cfg.pretrain.train.chunked_loss)
    return cfg, d, parts, engine, parts.batches(start_step)


def full_weights(module) -> dict:
    """Every parameter whole, as fp32 copies (gathered first under ZeRO-3); a collective there."""
    import deepspeed

    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params if hasattr(p, "ds_id")]):
        return {n: p.detach().float().clone() for n, p in params}


def run_steps(engine, loss_fn, batches, n, world=None):
    """Train n steps (rank-local loss weighting); returns each step's mean loss per target,
    over all ranks when `world` is given."""
    import torch

    losses = []
    for _ in range(n):
        batch = next(batches)
        step_losses = []
        for micro in batch.micro:
            step_losses.append(engine.forward_backward(micro, loss_fn, len(batch.micro) / sum(batch.targets)))
            engine.step()
        total, count = float(torch.stack(step_losses).sum()), sum(batch.targets)
        if world is not None:
            total, count = world.all_reduce_sum([total, count])
        losses.append(total / count)
    return losses


def checkpoint_roundtrip(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Train 3 steps, commit a checkpoint, train 2 more; a fresh engine resumed from the
    checkpoint must reproduce those 2 steps exactly. Then export and report."""
    import torch

    from dist_train.checkpoint.export import describe_model, export_checkpoint
    from dist_train.checkpoint.manager import CheckpointManager

    from dist_train.model.build import flops_per_token

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    fpt_engine = flops_per_token(engine.module, 32)  # under ZeRO-3 the parameters are partitioned by now
    ckpt = CheckpointManager(Path(cfg.output_dir) / "ckpt", world, keep=2,
                             run_info={"stage": "pretrain", "config": cfg_dict},
                             describe=lambda d: describe_model(parts.model, parts.tokenizer, d))
    first = run_steps(engine, parts.loss_fn, batches, 3)
    tag = ckpt.save(engine, 3, {"train_state": {"step": 3}})
    rng_draw = torch.rand(3).tolist()  # what the RNG gives right after the save
    after = run_steps(engine, parts.loss_fn, batches, 2)
    final_params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}

    cfg2, _, parts2, engine2, _ = build(cfg_dict, world)
    client = engine2.load(str(ckpt.root), ckpt.resume_tag())
    from dist_train.checkpoint.manager import restore_rng

    assert restore_rng(ckpt.root / tag, rank)
    rng_same = torch.rand(3).tolist() == rng_draw
    engine2.train(False)
    with torch.no_grad():  # what the engine computes at the checkpoint, for the export to match
        logits = engine2.forward({"input_ids": torch.arange(1, 17).unsqueeze(0)}).logits.float()
    engine2.train(True)
    resumed = run_steps(engine2, parts2.loss_fn, parts2.batches(client["train_state"]["step"]), 2)
    same = all(torch.equal(final_params[n], p.detach().float()) for n, p in engine2.module.named_parameters())
    if world.is_main:
        export_checkpoint(ckpt.root / tag, Path(cfg.output_dir) / "export")
        torch.save(logits, Path(cfg.output_dir) / "engine_logits.pt")
        Path(out).write_text(json.dumps({"first": first, "after": after, "resumed": resumed, "same_params": same, "rng_same": rng_same, "fpt_engine": fpt_engine,
                                         "tag": tag, "client": client["train_state"]}))
    torch.distributed.destroy_process_group()


def elastic_save(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Phase 1 of an elastic resume: train 3 steps on `world_size` ranks and commit; then 2 more."""
    import torch

    from dist_train.checkpoint.manager import CheckpointManager

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    ckpt = CheckpointManager(Path(cfg.output_dir) / "ckpt", world, keep=2, run_info={})
    run_steps(engine, parts.loss_fn, batches, 3)
    ckpt.save(engine, 3, {"train_state": {"step": 3}})
    after = run_steps(engine, parts.loss_fn, batches, 2, world)
    if world.is_main:
        Path(out).write_text(json.dumps({"after": after}))
    torch.distributed.destroy_process_group()


def elastic_load(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Phase 2: resume the committed checkpoint on a different number of ranks; train 2 steps."""
    import torch

    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import from_dict
    from dist_train.train.engine import build_engine
    from dist_train.train.pretrain import build_pretrain

    world = init_process(rank, world_size, port)
    cfg = from_dict(cfg_dict)
    d = derive_stage(cfg, "pretrain", world.world_size)
    ckpt = CheckpointManager(Path(cfg.output_dir) / "ckpt", world, keep=2, run_info={})
    tag = ckpt.resume_tag()
    load_dir, universal = ckpt.load_source(tag)
    parts = build_pretrain(cfg, d, world)
    ds = {**d.deepspeed, "checkpoint": {"load_universal": universal}}
    engine = build_engine(parts.model, ds, cfg.pretrain.optim.weight_decay)
    client = engine.load(str(load_dir), tag)
    resumed = run_steps(engine, parts.loss_fn, parts.batches(client["train_state"]["step"]), 2, world)
    if world.is_main:
        Path(out).write_text(json.dumps({"resumed": resumed, "universal": universal, "lr": engine.lr}))
    torch.distributed.destroy_process_group()


def corrupt_fallback(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Commit steps 2 and 4, flip one byte of step 4: resume must pick step 2, and load it."""
    import torch

    from dist_train.checkpoint.manager import CheckpointManager

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    root = Path(cfg.output_dir) / "ckpt"
    ckpt = CheckpointManager(root, world, keep=3, run_info={})
    run_steps(engine, parts.loss_fn, batches, 2)
    ckpt.save(engine, 2, {"train_state": {"step": 2}})
    run_steps(engine, parts.loss_fn, batches, 2)
    ckpt.save(engine, 4, {"train_state": {"step": 4}})
    if world.is_main:
        victim = sorted((root / "step_00000004").rglob("*optim_states.pt"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    world.barrier()
    fresh = CheckpointManager(root, world, keep=3, run_info={})
    tag = fresh.resume_tag()
    client = engine.load(str(root), tag)
    if world.is_main:
        Path(out).write_text(json.dumps({"tag": tag, "step": client["train_state"]["step"]}))
    torch.distributed.destroy_process_group()


def train_with_loop(rank: int, world_size: int, port: int, cfg_dict: dict, out: str, steps: int = 4):
    """Run the real training loop for a few steps; rank 0 writes per-step losses and the weights."""
    import torch

    from dist_train.data.ledger import Ledger
    from dist_train.model.build import flops_model
    from dist_train.train.loop import Cadence, TrainState, train_loop
    from dist_train.train.metrics import MetricsLog, Throughput

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    start = full_weights(engine.module)
    metrics = Path(out).with_suffix(".jsonl")
    log = MetricsLog(metrics if world.is_main else None, "pretrain", steps, None)
    train_loop(engine=engine, batches=batches, loss_fn=parts.loss_fn, state=TrainState(), cadence=Cadence(steps, 1, 0, 0),
               evaluate=lambda: {}, save=lambda step: None, log=log, ledger=Ledger(rank, world_size, 0.0),
               world=world, flops=flops_model(parts.model), peak_flops=1e12,
               throughput=Throughput())
    log.close()
    end = full_weights(engine.module)
    if world.is_main:
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
        torch.save(end, Path(out).with_suffix(".pt"))
        torch.save(start, Path(out).with_suffix(".init.pt"))
        Path(out).write_text(json.dumps({"losses": losses, "chunked_head": engine.head is not None}))
    torch.distributed.destroy_process_group()


def partitioned_build(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Build the stage's model under ZeRO-3 and report what this rank holds before DeepSpeed
    wraps it; then check one gathered weight against the pretrained file and train one step."""
    import deepspeed
    import torch
    from safetensors.torch import load_file

    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import from_dict
    from dist_train.train.engine import build_engine
    from dist_train.train.pretrain import build_pretrain

    world = init_process(rank, world_size, port)
    cfg = from_dict(cfg_dict)
    d = derive_stage(cfg, "pretrain", world.world_size)
    parts = build_pretrain(cfg, d, world)
    params = list(parts.model.named_parameters())
    held = sum(p.ds_tensor.numel() for _, p in params if hasattr(p, "ds_tensor"))
    report = {"all_partitioned": all(hasattr(p, "ds_tensor") and p.numel() == 0 for _, p in params),
              "held": held, "full": sum(p.ds_numel for _, p in params)}
    if cfg.model.name_or_path:  # pretrained weights went into the shards intact
        ref = load_file(f"{cfg.model.name_or_path}/model.safetensors")
        name, p = next((n, p) for n, p in params if n.endswith("encoder.layer.0.attention.self.query.weight"))
        with deepspeed.zero.GatheredParameters([p]):
            key = next(k for k in ref if k.endswith("encoder.layer.0.attention.self.query.weight"))
            # partitioned init already holds parameters in the training precision (bf16), as
            # DeepSpeed's ZeRO-1/2 engines do once initialised
            report["pretrained_equal"] = bool(torch.equal(p.detach(), ref[key].to(p.dtype)))
    engine = build_engine(parts.model, d.deepspeed, cfg.pretrain.optim.weight_decay)
    report["loss"] = run_steps(engine, parts.loss_fn, parts.batches(0), 1, world)[0]
    if world.is_main:
        Path(out).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def fp16_loop(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """train_with_loop in fp16. This CPU has no native fp16 kernels, so DeepSpeed's CPU accelerator
    refuses fp16; torch emulates fp16 on CPU correctly (slowly), so the test lets DeepSpeed use it
    and exercises its real dynamic loss scaler."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True
    train_with_loop(rank, world_size, port, cfg_dict, out, steps=20)


def finetune_export(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Fine-tune a few steps (LoRA, ZeRO-3, fp32), commit, export merged and adapter-only; the
    engine's metrics on a file must equal those of the merged export (loaded with plain
    transformers), and the adapter export must give the merged export's logits."""
    import torch

    from dist_train.checkpoint.export import describe_model, export_checkpoint
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import from_dict
    from dist_train.tasks.predict import load_export
    from dist_train.train.engine import build_engine
    from dist_train.train.finetune import build_finetune

    world = init_process(rank, world_size, port)
    cfg = from_dict(cfg_dict)
    d = derive_stage(cfg, "finetune", world.world_size)
    parts = build_finetune(cfg, d, world)
    trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    engine = build_engine(parts.model, d.deepspeed, cfg.finetune.optim.weight_decay)
    root = Path(cfg.output_dir) / "ckpt"
    ckpt = CheckpointManager(root, world, keep=2, run_info={"stage": "finetune", "config": cfg_dict, **parts.run_info},
                             describe=lambda p: describe_model(parts.model, parts.tokenizer, p, parts.run_info["task"]))
    losses = run_steps(engine, parts.loss_fn, parts.batches(0), 4, world)
    tag = ckpt.save(engine, 4, {"train_state": {"step": 4}})
    engine_eval = parts.evaluate(engine)  # validation = the test file here
    merged, adapter = Path(cfg.output_dir) / "merged", Path(cfg.output_dir) / "adapter"
    if world.is_main:
        export_checkpoint(root / tag, merged)
        export_checkpoint(root / tag, adapter, adapter_only=True)
    world.barrier()
    export_eval = parts.final(merged)["test"]
    if world.is_main:
        m, tok, task = load_export(merged)
        a, _, _ = load_export(adapter)
        batch = task.encode([{"text": "Return the cosine of x.", "label": "math"}], with_labels=False)
        with torch.no_grad():
            lm, la = m(**batch).logits, a(**batch).logits
        Path(out).write_text(json.dumps({
            "losses": losses, "trainable": trainable, "total": sum(p.numel() for p in m.parameters()),
            "engine": {k: v for k, v in engine_eval.items() if k != "per_class"},
            "export": {k: v for k, v in export_eval.items() if k != "per_class"},
            "adapter_vs_merged": float((lm - la).abs().max()), "adapter_files": sorted(p.name for p in adapter.iterdir()),
            "merged_files": sorted(p.name for p in merged.iterdir())}))
    torch.distributed.destroy_process_group()


def param_digest(engine) -> str:
    """sha256 of every module parameter's bytes (ZeRO-2: each rank holds them all)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in engine.module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def save_with_fault(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """Commit step 2, then save step 4 with the configured fault (which may kill this process).
    A fault that raises is caught on every rank and reported; the digests of the weights at
    steps 2 and 4 are written first, for the resume check."""
    import torch

    from dist_train.checkpoint.manager import CheckpointManager, CheckpointWriteError
    from dist_train.faults import Faults

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    root = Path(cfg.output_dir) / "checkpoints"
    ckpt = CheckpointManager(root, world, keep=3, run_info={"stage": "pretrain", "config": cfg_dict},
                             faults=Faults(cfg.faults, Path(cfg.output_dir), "pretrain", rank))
    digests = {}
    run_steps(engine, parts.loss_fn, batches, 2)
    digests[2] = param_digest(engine)
    ckpt.save(engine, 2, {"train_state": {"step": 2}})
    run_steps(engine, parts.loss_fn, batches, 2)
    digests[4] = param_digest(engine)
    if world.is_main:
        Path(out).with_suffix(".digests").write_text(json.dumps(digests))
    world.barrier()
    try:  # the configured fault, or a real full disk
        ckpt.save(engine, 4, {"train_state": {"step": 4}})
        error = None
    except CheckpointWriteError as e:
        error = str(e)
    Path(out).with_suffix(f".rank{rank}").write_text(json.dumps({"error": error}))
    world.barrier()  # leave together: a rank tearing down gloo while its peer still works can SIGABRT it
    torch.distributed.destroy_process_group()


def resume_after_faults(rank: int, world_size: int, port: int, cfg_dict: dict, out: str, cases: list):
    """For each case directory: pick the resume checkpoint as a run would, load it into a fresh
    engine, and report the tag, the step in its client state and the loaded weights' digest."""
    import torch

    from dist_train.checkpoint.manager import CheckpointManager

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    results = {}
    for case in cases:
        root = Path(case) / "checkpoints"
        tag = CheckpointManager(root, world, keep=3, run_info={}).resume_tag()
        client = engine.load(str(root), tag)
        results[case] = {"tag": tag, "step": client["train_state"]["step"], "digest": param_digest(engine)}
    if world.is_main:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def collective_timeout(rank: int, world_size: int, port: int, out: str):
    """Rank 1 stays alive (its heartbeat beats) but never joins the all-reduce of step 4: rank 0's
    collective must fail within the process group's timeout, recognised and explained."""
    import datetime
    import time

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=3))
    from dist_train.launch.worker import is_collective_timeout
    from dist_train.train.heartbeat import Heartbeat
    from dist_train.world import World

    world = World(rank=rank, world_size=world_size)
    hb = Heartbeat(Path(out).parent, world, attempt=1.0, timeout_s=1.2).start()  # beats every 0.2 s
    for step in range(1, 5):
        if rank == 1 and step == 4:
            time.sleep(8)  # stuck after step 3, not dead
            break
        hb.progress(step)
        t0 = time.monotonic()
        try:
            world.all_reduce_sum([1.0])
        except RuntimeError as e:
            time.sleep(0.5)
            Path(out).write_text(json.dumps({"recognised": is_collective_timeout(e), "waited": time.monotonic() - t0,
                                             "behind": hb.others_behind(), "step": step}))
            break
    hb.stop()


def full_params(engine) -> dict:
    """Every parameter, whole (gathered under ZeRO-3), as fp32 on CPU."""
    import deepspeed
    import torch

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext():
            out[name] = p.detach().float().clone()
    return out


def warmed_engine(cfg, d, world):
    """The stage's model and an engine with a 2-step head warm-up (ramp 2)."""
    from dist_train.model.build import new_parameters
    from dist_train.train.engine import build_engine
    from dist_train.train.head_warmup import HeadWarmup
    from dist_train.train.pretrain import build_pretrain

    parts = build_pretrain(cfg, d, world)
    head = new_parameters(parts.model, parts.loaded.new)
    head_ids = {id(p) for p in head}
    body = [p for p in parts.model.parameters() if id(p) not in head_ids]
    engine = build_engine(parts.model, d.deepspeed, cfg.pretrain.optim.weight_decay, head)
    return parts, engine, HeadWarmup(engine, body, steps=2, ramp=2, head_lr=1e-2), head_ids


def head_warmup(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """The checkpoint lacks the masked-LM head: during a 2-step warm-up only the head moves (the body
    stays bit for bit), then everything trains; a run resumed from a checkpoint inside the warm-up ends
    where the uninterrupted one does. Also: the evaluation before any step, on this world size."""
    import torch

    from dist_train.checkpoint.export import describe_model
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import from_dict

    world = init_process(rank, world_size, port)
    cfg = from_dict(cfg_dict)
    d = derive_stage(cfg, "pretrain", world.world_size)
    parts, engine, warm, head_ids = warmed_engine(cfg, d, world)
    head_names = {n for n, p in engine.module.named_parameters() if id(p) in head_ids}
    ckpt = CheckpointManager(Path(cfg.output_dir) / "ckpt", world, keep=2,
                             run_info={"stage": "pretrain", "config": cfg_dict, "head_warmup_steps": 2},
                             describe=lambda d: describe_model(parts.model, parts.tokenizer, d))
    evaluation = parts.evaluate(engine)
    engine.train()
    batches = parts.batches(0)
    snapshots = [full_params(engine)]
    for step in range(4):
        warm.at(step)
        run_steps(engine, parts.loss_fn, batches, 1)
        snapshots.append(full_params(engine))
        if step == 0:  # a checkpoint inside the warm-up
            ckpt.save(engine, 1, {"train_state": {"step": 1}})
    _, engine2, warm2, _ = warmed_engine(cfg, d, world)
    engine2.load(str(ckpt.root), ckpt.resume_tag())
    engine2.train()
    batches2 = parts.batches(1)
    for step in range(1, 4):
        warm2.at(step)
        run_steps(engine2, parts.loss_fn, batches2, 1)
    resumed = full_params(engine2)

    def moved(a: dict, b: dict, names: set) -> list:
        return sorted(n for n in names if not torch.equal(a[n], b[n]))

    body_names = set(snapshots[0]) - head_names
    report = {"new": list(parts.loaded.new), "head_names": sorted(head_names), "evaluation": evaluation,
              "body_moved_in_warmup": moved(snapshots[0], snapshots[2], body_names),
              "head_moved_in_warmup": moved(snapshots[0], snapshots[2], head_names),
              "body_moved_after": moved(snapshots[2], snapshots[4], body_names),
              "resumed_differs": moved(resumed, snapshots[4], set(resumed)),
              "groups": [bool(g.get("body")) for g in engine.ds.optimizer.param_groups]}
    if world.is_main:
        Path(out).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def nonfinite_loop(rank: int, world_size: int, port: int, cfg_dict: dict, out: str):
    """The real loop with a learning rate that blows the weights up: it must stop with NonFiniteLoss on every
    rank at the same step, having saved only finite steps."""
    from dist_train.data.ledger import Ledger
    from dist_train.model.build import FlopsModel, flops_model
    from dist_train.train.loop import Cadence, NonFiniteGuard, NonFiniteLoss, TrainState, train_loop
    from dist_train.train.metrics import MetricsLog, Throughput

    world = init_process(rank, world_size, port)
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    saved: list[int] = []
    state = TrainState()
    error = None
    try:
        train_loop(engine=engine, batches=batches, loss_fn=parts.loss_fn, state=state, cadence=Cadence(12, 1, 0, 1),
                   evaluate=lambda: {}, save=saved.append, log=MetricsLog(None, "pretrain", 12, None),
                   ledger=Ledger(rank, world_size, 0.0), world=world, flops=flops_model(parts.model),
                   peak_flops=1e12, throughput=Throughput(), nonfinite=NonFiniteGuard(2))
    except NonFiniteLoss as e:
        error = str(e)
    # One more step, the last of the stage, is non-finite too: fewer than the patience, but the stage must
    # not end as a success either.
    at_end = None
    try:
        train_loop(engine=engine, batches=batches, loss_fn=parts.loss_fn, state=state,
                   cadence=Cadence(state.step + 1, 1, 0, 1), evaluate=lambda: {}, save=saved.append,
                   log=MetricsLog(None, "pretrain", state.step + 1, None), ledger=Ledger(rank, world_size, 0.0),
                   world=world, flops=FlopsModel(1.0, 0.0), peak_flops=1e12, throughput=Throughput(),
                   nonfinite=NonFiniteGuard(5))
    except NonFiniteLoss as e:
        at_end = str(e)
    # DeepSpeed's ZeRO optimizer skips steps whose gradients overflow, so the weights stay finite (and huge)
    # here; with lr=inf (which the config now refuses) they turned NaN. Such a checkpoint the export refuses.
    import torch

    with torch.no_grad():  # the fp32 master weights the export reads
        for part in engine.ds.optimizer.single_partition_of_fp32_groups:
            part.view(-1)[0] = float("nan")
    from dist_train.checkpoint.export import describe_model, export_checkpoint
    from dist_train.checkpoint.manager import CheckpointManager

    ckpt = CheckpointManager(Path(cfg.output_dir) / "ckpt", world, keep=2, run_info={"stage": "pretrain", "config": cfg_dict},
                             describe=lambda d: describe_model(parts.model, parts.tokenizer, d))
    tag = ckpt.save(engine, state.step, {"train_state": state.state_dict()})
    refused = None
    if world.is_main:
        try:
            export_checkpoint(ckpt.root / tag, Path(cfg.output_dir) / "export")
        except ValueError as e:
            refused = str(e)
    Path(f"{out}.{rank}").write_text(json.dumps({"error": error, "at_end": at_end, "saved": saved, "step": state.step,
                                                 "refused": refused, "exported": (Path(cfg.output_dir) / "export").exists()}))
    import torch

    torch.distributed.destroy_process_group()


def loop_checks(rank: int, world_size: int, port: int, cfg_dict: dict, out: str, check_every_s: float):
    """The real loop for up to 20 steps (log every 5), counting its all-reduces; rank 0 asks to stop from
    step 7 on. Writes, per rank: all-reduce sizes, the steps saved, where it stopped."""
    import dataclasses

    import dist_train.train.loop as loop
    from dist_train.data.ledger import Ledger
    from dist_train.model.build import flops_model
    from dist_train.train.loop import Cadence, NonFiniteGuard, TrainState, train_loop
    from dist_train.train.metrics import MetricsLog, Throughput
    from dist_train.world import World

    calls: list[int] = []

    @dataclasses.dataclass(frozen=True)
    class CountingWorld(World):  # the real collectives, counted
        def all_reduce_sum(self, values: list[float]) -> list[float]:
            calls.append(len(values))
            return super().all_reduce_sum(values)

    world = CountingWorld(**dataclasses.asdict(init_process(rank, world_size, port)))
    cfg, d, parts, engine, batches = build(cfg_dict, world)
    loop.CHECK_EVERY_S = check_every_s
    state, saved = TrainState(), []
    calls.clear()  # building the engine all-reduces too
    train_loop(engine=engine, batches=batches, loss_fn=parts.loss_fn, state=state, cadence=Cadence(20, 5, 0, 0),
               evaluate=lambda: {}, save=saved.append, log=MetricsLog(None, "pretrain", 20, None),
               ledger=Ledger(rank, world_size, 0.0), world=world, flops=flops_model(parts.model), peak_flops=1e12,
               throughput=Throughput(), stop_requested=lambda: state.step >= 7, nonfinite=NonFiniteGuard(3))
    Path(f"{out}.{rank}").write_text(json.dumps({"calls": calls, "saved": saved, "step": state.step,
                                                 "preempted": state.preempted}))
    import torch

    torch.distributed.destroy_process_group()
