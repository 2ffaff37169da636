"""Honest MFU: FLOPs count what the matmuls compute, and GPU peaks come from exact device names."""

from __future__ import annotations

import pytest
import torch

from dist_train.model.build import FlopsModel, flops_model, flops_per_token
from dist_train.train.metrics import Throughput, device_peak_flops, table_peak

H, FF, L, V, HEADS, KV = 32, 64, 2, 101, 4, 2
KV_DIM = KV * (H // HEADS)


def llama(auto: str, **kw):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, **kw)
    return getattr(transformers, auto)(cfg)


BLOCK = 2 * H * H + 2 * H * KV_DIM + 3 * H * FF  # q, o; k, v; gate, up, down


def test_a_task_head_with_tied_embeddings_counts_no_embedding():
    model = llama("LlamaForSequenceClassification", num_labels=3, tie_word_embeddings=True)
    f = flops_model(model)
    assert f.per_token == 6 * (L * BLOCK + 3 * H)  # the blocks and the score head; the lookup costs nothing
    assert f.head == 0 and f.per_attention == 12 * L * H


def test_an_lm_head_counts_once_tied_or_not():
    for tied in (True, False):
        f = flops_model(llama("LlamaForCausalLM", tie_word_embeddings=tied))
        assert f.per_token == 6 * L * BLOCK and f.head == 6 * V * H, tied
    assert flops_per_token(llama("LlamaForCausalLM"), 16) == 6 * L * BLOCK + 6 * V * H + 12 * L * H * 16


def test_lora_counts_frozen_weights_at_4_and_adapters_at_6():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama("LlamaForCausalLM"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    f = flops_model(model)
    adapters = L * 4 * ((H + H) + (H + KV_DIM))
    assert f.per_token == 4 * L * BLOCK + 6 * adapters
    assert f.head == 4 * V * H  # the LM head is frozen too


def test_attention_width_is_heads_times_head_dim_not_the_hidden_size():
    # Qwen3-0.6B style: 16 heads of 128 (2048 wide) on a hidden size of 1024; here 4 heads of 16 on 32
    f = flops_model(llama("LlamaForCausalLM", head_dim=16))
    assert f.per_attention == 12 * L * HEADS * 16


def test_a_mixture_of_experts_counts_the_top_k_share_of_its_experts():
    import transformers

    E, K = 4, 2
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=HEADS,
        num_key_value_heads=KV, num_local_experts=E, num_experts_per_tok=K, tie_word_embeddings=False))
    attention, router, experts = 2 * H * H + 2 * H * KV_DIM, E * H, E * 3 * H * FF
    f = flops_model(model)
    assert f.per_token == 6 * L * (attention + router + experts * K / E)
    assert f.head == 6 * V * H


def test_attention_counts_real_lengths_and_the_chunked_head_only_targets():
    f = FlopsModel(per_token=100.0, per_attention=10.0, head=1000.0)
    # two examples of 3 and 5 tokens: 8 tokens, 9 + 25 attention pairs (not 2 × 8² of a padded batch)
    assert f.of(8, 34) == 100 * 8 + 10 * 34 + 1000 * 8
    assert f.of(8, 34, head_tokens=2) == 100 * 8 + 10 * 34 + 1000 * 2
    t = Throughput(skip=0)
    t.add(8, 2.0, f.of(8, 34))
    assert t.flops_per_s == f.of(8, 34) / 2 and t.flops_per_token == f.of(8, 34) / 8


@pytest.mark.parametrize(("name", "dtype", "peak", "key"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12, "H100 SXM"),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12, "H100 PCIe"),
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12, "H100 NVL"),
    ("NVIDIA H200", torch.bfloat16, 989e12, "H200"),
    ("NVIDIA H200 NVL", torch.float16, 835e12, "H200 NVL"),
    ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312e12, "A100"),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5e12, "A100"),
    ("NVIDIA L40S", torch.bfloat16, 362e12, "L40S"),
    ("NVIDIA L40", torch.bfloat16, 181e12, "L40"),  # not an L4's
    ("NVIDIA L4", torch.bfloat16, 121e12, "L4"),
    ("NVIDIA B200", torch.bfloat16, 2250e12, "B200"),
    ("NVIDIA H100 80GB HBM3", torch.float32, 67e12, "H100 SXM"),  # fp32 runs against fp32 peaks
])
def test_gpu_peaks_come_from_the_exact_device(name, dtype, peak, key):
    assert table_peak(name, dtype) == (peak, key)


def test_unknown_gpus_and_missing_fp32_figures_are_measured():
    assert table_peak("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    assert table_peak("NVIDIA A10G", torch.bfloat16) is None  # not an A10: no guess
    assert table_peak("NVIDIA B200", torch.float32) is None
    peak, source = device_peak_flops(False, torch.float32, 1)
    assert peak > 1e8 and source.startswith("measured:cpu x1 threads")
