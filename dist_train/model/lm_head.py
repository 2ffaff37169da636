"""Language-model losses, and an LM head that computes its loss chunk by chunk.

A causal or masked LM's loss needs logits over the whole vocabulary, and at a 128k vocabulary
those (in fp32 for the cross-entropy, with their gradient) outweigh the rest of a checkpointed
model's activations. `ChunkedLMHead` takes the place of the model's output Linear during training:
given the targets, its forward keeps only the positions that have one (an MLM's masked 15%, an SFT
response), runs them through the head a chunk of rows at a time, and returns the summed
cross-entropy, with the gradients of its inputs computed on the way, so at most one chunk of fp32
logits ever exists. Outside `loss_of` it is the plain Linear (evaluation, generation, export).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dist_train.config.memory import LOSS_CHUNK_ELEMENTS

IGNORE = -100
# transformers configs whose models transform logits after the head: the chunked loss would skip that
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                    "lm_head_multiplier", "output_multiplier")


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """Summed cross-entropy of a language model; `shift` predicts token t+1 from position t (clm)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


class LMLoss:
    """The summed LM cross-entropy as a loss function (logits, labels) -> loss, which the engine can
    hand to a ChunkedLMHead instead: `targets` gives, per position, the token it must predict."""

    def __init__(self, shift: bool) -> None:
        self.shift = shift

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, labels, shift=self.shift)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, T): the target of each position (-100: none); with the shift, position t predicts t+1."""
        if not self.shift:
            return labels
        return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) over rows, a chunk of rows at a time; the
    gradients are computed in forward (when asked for), so backward only scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int, grads: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_h, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        want_b = grads and bias is not None and ctx.needs_input_grad[2]
        # fp16: the input gradient is kept in fp32 until backward has applied the loss scale, since the
        # softmax's small entries would underflow in fp16 before it (bf16 has fp32's range)
        h_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
        g_hidden = torch.empty(hidden.shape, dtype=h_dtype, device=hidden.device) if want_h else None
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        g_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]
            logits = torch.nn.functional.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                continue
            d = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits: one chunk alive
            d[torch.arange(len(y), device=d.device), y] -= 1.0  # d loss / d logits
            if g_hidden is not None:
                g_hidden[start:start + rows] = d.to(h_dtype) @ weight.to(h_dtype)
            if g_weight is not None:
                g_weight.addmm_(d.t(), h.float())
            if g_bias is not None:
                g_bias += d.sum(0)
        ctx.save_for_backward(*(g for g in (g_hidden, g_weight, g_bias) if g is not None))
        ctx.has = (g_hidden is not None, g_weight is not None, g_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        out = [(next(saved) * grad).to(dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes, strict=True)]
        return (*out, None, None, None)


class ChunkedLMHead(torch.nn.Linear):
    """A model's output Linear that, inside `loss_of(targets)`, returns the summed cross-entropy of
    the positions with a target instead of logits (see the module docstring). Made from an existing
    Linear by `chunked_head`, so its weight (tied or not, ZeRO-partitioned or not) stays the same."""

    targets: torch.Tensor | None = None
    grads: bool = True
    output: torch.Tensor | None = None  # what the last forward inside loss_of returned

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return super().forward(hidden)
        flat = self.targets.reshape(-1).to(hidden.device)
        keep = flat != IGNORE
        rows = max(1, LOSS_CHUNK_ELEMENTS // self.out_features)
        self.output = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1])[keep], self.weight, self.bias,
                                                 flat[keep], rows, self.grads)
        return self.output

    @contextlib.contextmanager
    def loss_of(self, targets: torch.Tensor) -> Iterator[None]:
        """Within this, a forward returns the loss of `targets` ((B, T), -100 where none); `grads`
        follows torch's grad mode at entry (no gradient work under torch.no_grad)."""
        self.targets, self.grads, self.output = targets, torch.is_grad_enabled(), None
        try:
            yield
        finally:
            self.targets = self.output = None


def chunked_head(model: torch.nn.Module) -> ChunkedLMHead | None:
    """Turn `model`'s output Linear into a ChunkedLMHead (in place) and return it; None when the model
    has no plain Linear head (a task head, a LoRA-wrapped head) or transforms its logits after it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    config = getattr(model, "config", None)
    # a multimodal wrapper keeps the language model's settings in its text config
    configs = [config, *([config.get_text_config()] if hasattr(config, "get_text_config") else [])]
    if type(head) is not torch.nn.Linear or any(getattr(c, k, None) for c in configs for k in LOGIT_TRANSFORMS):
        return head if isinstance(head, ChunkedLMHead) else None
    head.__class__ = ChunkedLMHead
    return head
