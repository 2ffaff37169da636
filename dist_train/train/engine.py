"""The one DeepSpeed seam. Everything else talks to `Engine`, never to deepspeed directly.

It owns forward/backward over micro batches (DeepSpeed applies the optimizer step, clipping,
loss scaling and the LR schedule at the accumulation boundary) and checkpoint save/load of
model + optimizer + scheduler + client state.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dist_train.deepspeed_import import import_deepspeed
from dist_train.model.build import param_groups
from dist_train.model.lm_head import ChunkedLMHead, LMLoss, chunked_head
from dist_train.train.loss import LossFn


class Engine:
    """A DeepSpeed engine behind a small surface the training loop can read at a glance."""

    def __init__(self, ds_engine: Any, head: ChunkedLMHead | None = None) -> None:
        self.ds = ds_engine
        self.head = head  # the chunked LM head (train.chunked_loss), which computes LMLoss itself

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_fn: LossFn, weight: float) -> torch.Tensor:
        """Forward and backward one micro batch: the loss is `loss_fn(logits, labels)` (a sum over
        its targets), scaled by `weight` for the gradient. Returns the detached sum (no host sync)."""
        loss = self.loss(batch, loss_fn)
        self.ds.backward(loss * weight)
        return loss.detach()

    def loss(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """`loss_fn(logits, labels)` of one micro batch (with gradients unless under torch.no_grad);
        an LM loss goes through the chunked LM head when there is one, so no full logits are made."""
        batch = self._to_device(batch)
        labels = batch.pop("labels")
        if self.head is not None and isinstance(loss_fn, LMLoss):
            with self.head.loss_of(loss_fn.targets(labels)):
                loss = self.ds(**batch).logits  # the head's output: the summed loss
                # the same storage, not the same object: ZeRO-3's module hooks hand outputs on as detached
                # aliases wired into autograd; a soft-cap or scale would have made a new tensor
                out = self.head.output
                if out is not None and loss.shape == out.shape and loss.data_ptr() == out.data_ptr():
                    return loss
            # The model changed what its head returned (a soft-cap or scale that no config key named):
            # that would be applied to the loss itself. Use full logits from now on (the same on every
            # rank: it depends only on the model's code); this micro batch's forward is simply repeated.
            print("[train] the model transforms its logits after the LM head; train.chunked_loss is off for this "
                  "run (full logits)", flush=True)
            self.head = None
        return loss_fn(self.ds(**batch).logits, labels)

    def step(self) -> None:
        """Call once per micro batch; DeepSpeed steps the optimizer at the accumulation boundary."""
        self.ds.step()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.ds(**self._to_device(batch))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ds.device, non_blocking=True) for k, v in batch.items()}

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def set_group_lrs(self, lr_of: Callable[[dict[str, Any], float], float]) -> None:
        """For the next optimizer step, each parameter group's learning rate is `lr_of(group, the
        schedule's value)`; groups carry the marks of model/build.py's param_groups. The schedule
        computes every value from its step count, so this never compounds."""
        scheduled = self.ds.lr_scheduler.get_lr()
        for group, lr in zip(self.ds.optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr_of(group, lr)

    @property
    def grad_norm(self) -> float:
        norm = self.grad_norm_held
        return float(norm) if norm is not None else float("nan")

    @property
    def grad_norm_held(self) -> torch.Tensor | float | None:
        """The last step's global gradient norm as DeepSpeed holds it: a device tensor or a float (None when it
        computed none). Unlike grad_norm, reading it never waits for the device."""
        return self.ds.get_global_grad_norm()

    @property
    def skipped_steps(self) -> int:
        return int(getattr(self.ds, "skipped_steps", 0))

    @property
    def loss_scale(self) -> float | None:
        """fp16's dynamic loss scale (halved on each overflow, which skips that step); None otherwise."""
        if not self.ds.fp16_enabled():
            return None
        return float(getattr(self.ds.optimizer, "loss_scale", float("nan")))

    def save(self, save_dir: str, tag: str, client_state: dict[str, Any]) -> None:
        """Write this rank's part of a checkpoint into save_dir/tag (a collective: all ranks call it)."""
        # The empty universal_checkpoint_info lets ds_to_universal convert the checkpoint for a
        # different world size later.
        state = {**client_state, "universal_checkpoint_info": {}}
        try:
            self.ds.save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False)
        except Exception:
            # DeepSpeed's save ends in a barrier that a rank failing mid-write skips: meet the others
            # there, so every rank's next collective (the save's agreement) is the same one.
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.barrier()
            raise

    def load(self, load_dir: str, tag: str) -> dict[str, Any]:
        """Restore model, optimizer and scheduler from load_dir/tag; returns the client state."""
        path, client_state = self.ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
        return client_state or {}


@contextlib.contextmanager
def model_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this. Under ZeRO-3 it turns on DeepSpeed's partitioned init
    (`zero.Init`, through transformers' DeepSpeed glue): each parameter is split over the ranks as
    it is created and pretrained weights are loaded into the shards, so no rank ever holds the
    whole model, and a model larger than one worker's memory can be built. Other stages: no-op."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    init_distributed()
    hf_ds = HfDeepSpeedConfig(ds_config)  # registered by weak reference: keep it alive while building
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds


def init_distributed() -> None:
    """DeepSpeed's communication setup, adopting the process group Ray Train (or a test) has set up.
    On CPU it builds a shared-memory op and print()s that it did, once per rank: that line is dropped."""
    deepspeed = import_deepspeed()
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed()


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], weight_decay: float,
                 head: list[torch.nn.Parameter] | None = None, chunked_loss: bool = True) -> Engine:
    """Wrap a model in a DeepSpeed engine configured by the rendered JSON (derived.py). `head`: the
    parameters a head warm-up trains first, in parameter groups of their own (the rest marked body).
    `chunked_loss`: an LM's output Linear becomes a ChunkedLMHead (model/lm_head.py) first."""
    deepspeed = import_deepspeed()
    init_distributed()
    lm_head = chunked_head(model) if chunked_loss else None

    if ds_config["zero_optimization"]["stage"] == 3:
        # Parameters created after partitioned construction (LoRA adapters) are still full fp32
        # tensors: give them the training dtype, which ZeRO-3 requires of every trainable one.
        dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float16 if ds_config["fp16"]["enabled"] \
            else None
        for p in model.parameters():
            if dtype is not None and not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay, head),
                                              config=ds_config)
    return Engine(ds_engine, lm_head)
