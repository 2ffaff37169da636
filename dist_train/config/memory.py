"""Per-rank model-state memory under ZeRO: the ZeRO paper's arithmetic (Rajbhandari et al. 2020, §3).

Mixed-precision Adam keeps, per parameter, 2 bytes of 16-bit weights, 2 bytes of 16-bit
gradients and K = 12 bytes of optimizer state (fp32 master weights, momentum, variance): 16
bytes in all. ZeRO-1 partitions the optimizer state over the N data-parallel ranks, ZeRO-2 the
gradients too, ZeRO-3 the weights too. In fp32 training, weights and gradients take 4 bytes each
and the optimizer 8 (momentum, variance; the weights are their own master copy). Offload moves
the partitioned optimizer state (and, at stage 3, the weights) to CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

LOSS_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk of the chunked LM loss (64 MiB; model/lm_head.py)


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of model state one rank holds, split by kind and by device."""

    weights: float
    gradients: float
    optimizer: float
    on_cpu: float  # the part of the above that offload keeps in CPU memory

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def on_device(self) -> float:
        return self.total - self.on_cpu


def model_state_bytes(params: float, zero_stage: int, world: int, precision: str = "bf16",
                      offload_optimizer: bool = False, offload_params: bool = False,
                      trainable: float | None = None) -> ModelStateBytes:
    """Per-rank bytes of weights, gradients and Adam state for `params` parameters (ZeRO paper §3).

    With adapters (LoRA), only `trainable` parameters have gradients and optimizer state; the
    frozen ones are weights alone."""
    half = precision in ("bf16", "fp16")
    w_b, g_b, k = (2, 2, 12) if half else (4, 4, 8)
    trainable = params if trainable is None else trainable
    weights = params * w_b / (world if zero_stage >= 3 else 1)
    grads = trainable * g_b / (world if zero_stage >= 2 else 1)
    optim = trainable * k / (world if zero_stage >= 1 else 1)
    on_cpu = (optim if offload_optimizer else 0.0) + (weights if offload_params else 0.0)
    return ModelStateBytes(weights=weights, gradients=grads, optimizer=optim, on_cpu=on_cpu)


@dataclass(frozen=True)
class ArchShape:
    """What activation memory depends on, read from a model's HF config and module tree."""

    family: str  # "llama": RMSNorm, rotary, gated MLP, no dropout; "bert": LayerNorm, GELU MLP, dropout
    params: int  # every parameter of the model that trains
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layer_params: int  # one transformer block
    largest_param: int  # the largest single weight (embedding or LM head): ZeRO-3 gathers it whole


def layer_activation_bytes_per_token(shape: ArchShape, seq_len: int, act_bytes: int = 2,
                                     flash_attention: bool = True) -> float:
    """Bytes autograd keeps per token for one transformer block, between forward and backward.

    bert: Korthikanti et al. 2022 ("Reducing Activation Recomputation", eq. 1) per token:
    11h (attention) + 19h (a 4h MLP) + 4h (two LayerNorms) bytes at 16 bits with dropout masks,
    plus 5·heads·s for the attention scores; the MLP term is generalised to 3h + 4I.
    llama: counted the same way for HF's LlamaDecoderLayer: two RMSNorm inputs and outputs (4h),
    q and k before and after rotary (2h + 2kv), v (kv), the attention output (h), the gate, up,
    SiLU and product tensors of the MLP (4I); 7h + 3kv + 4I elements.
    Flash/memory-efficient attention (SDPA on GPU) keeps no seq_len² scores; without it they add
    2·heads·s elements (softmax output; llama has no attention dropout).
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)
    scale = act_bytes / 2  # the formulas count 16-bit activations
    if shape.family == "bert":
        per = (18 * h + 4 * i) * scale + (0 if flash_attention else 5 * shape.heads * seq_len * scale)
    else:
        per = (7 * h + 3 * kv + 4 * i) * act_bytes + (0 if flash_attention else 2 * shape.heads * seq_len * act_bytes)
    return float(per)


@dataclass(frozen=True)
class ActivationBytes:
    """Peak activation memory of one micro batch on one rank, by part."""

    blocks: float  # what the transformer blocks keep for backward
    lm_head: float  # logits, their fp32 copy for the loss, and its gradient (0 for small task heads)

    @property
    def total(self) -> float:
        return self.blocks + self.lm_head


def activation_bytes(shape: ArchShape, seq_len: int, micro_batch: int, checkpointing: bool, act_bytes: int = 2,
                     lm_head: bool = True, flash_attention: bool = True, chunked_loss: bool = False,
                     head_trains: bool = True) -> ActivationBytes:
    """Activations of one micro batch: every block's (no checkpointing), or with checkpointing each
    block's input (h elements per token) plus one block recomputed at a time during backward.

    The LM head's logits are (act_bytes + 4 + 4)·vocab bytes per token: the logits, HF's fp32
    copy for the cross-entropy, and the fp32 gradient; at a 128k vocabulary they outweigh a
    checkpointed model. The chunked loss (train.chunked_loss) keeps instead one chunk of fp32
    logits and its softmax, the hidden states' gradient, and (`head_trains`) the head weight's fp32
    gradient."""
    tokens = seq_len * micro_batch
    layer = layer_activation_bytes_per_token(shape, seq_len, act_bytes, flash_attention) * tokens
    blocks = (shape.layers * shape.hidden * act_bytes * tokens + layer) if checkpointing else shape.layers * layer
    if not lm_head:
        head = 0.0
    elif chunked_loss:
        head = (2 * 4 * LOSS_CHUNK_ELEMENTS + act_bytes * shape.hidden * tokens
                + (4 * shape.vocab * shape.hidden if head_trains else 0))
    else:
        head = (act_bytes + 8) * shape.vocab * tokens
    return ActivationBytes(blocks=float(blocks), lm_head=float(head))


def zero_buffer_bytes(shape: ArchShape, zero_stage: int, reduce_bucket: int, act_bytes: int = 2) -> float:
    """DeepSpeed's working buffers beside the model states: the gradient reduce bucket (ZeRO >= 1)
    and, at ZeRO-3, the gathered parameters: the block in use and the one prefetched, or the
    largest single weight (an embedding or LM head), whichever is larger."""
    if zero_stage == 0:
        return 0.0
    out = reduce_bucket * act_bytes
    if zero_stage == 3:
        out += max(2 * shape.layer_params, shape.largest_param) * act_bytes
    return float(out)


def checkpoint_bytes(params: float, trainable: float, precision: str = "bf16") -> float:
    """One DeepSpeed checkpoint on disk, all ranks together: the module's weights at training
    precision, plus fp32 master weights and the two Adam moments of what trains."""
    w = 2 if precision in ("bf16", "fp16") else 4
    master = 4 if w == 2 else 0
    return float(params * w + trainable * (master + 8))
