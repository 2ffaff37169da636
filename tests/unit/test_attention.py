"""model.attention: the kernel chosen per device, precision and installed packages, and what the model runs."""

import pytest
import torch

from dist_train.config.schema import TinyArch
from dist_train.model.attention import choose_attention
from dist_train.model.build import build_lm, kernel_for


@pytest.mark.parametrize("on_gpu, flash, precision, expected", [
    (False, True, "bf16", "sdpa"), (True, False, "bf16", "sdpa"), (True, True, "fp32", "sdpa"),
    (True, True, "bf16", "flash_attention_2"), (True, True, "fp16", "flash_attention_2")])
def test_auto_takes_flash_attention_only_on_a_gpu_with_flash_attn_in_half_precision(on_gpu, flash, precision,
                                                                                      expected):
    kernel, why = choose_attention("auto", on_gpu=on_gpu, precision=precision, flash_available=flash)
    assert kernel == expected and why.startswith("auto")
    assert choose_attention("eager", on_gpu=on_gpu, precision=precision, flash_available=flash) == \
        ("eager", "model.attention")


def test_the_model_runs_the_chosen_kernel_and_eager_computes_what_sdpa_does():
    arch = TinyArch(family="llama", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = {}
    for kernel in ("sdpa", "eager"):
        model, _ = build_lm(objective="clm", name_or_path=None, arch=arch, vocab_size=100, pad_token_id=0,
                            eos_token_id=1, seed=0, gradient_checkpointing=False, attention=kernel)
        assert model.config._attn_implementation == kernel
        losses[kernel] = float(model.eval()(input_ids=ids, labels=ids).loss)
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_a_model_class_without_a_flash_kernel_falls_back_to_sdpa():
    import transformers

    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    big_bird = transformers.BigBirdConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    auto = transformers.AutoModelForCausalLM
    assert kernel_for(auto, llama, "flash_attention_2") == "flash_attention_2"
    assert kernel_for(auto, big_bird, "flash_attention_2") == "sdpa"
    assert kernel_for(auto, big_bird, "eager") == "eager"
