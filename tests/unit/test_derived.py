from pathlib import Path

import pytest

from dist_train.config.derived import derive_stage
from dist_train.config.loader import ConfigError, load_config

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def cfg(*overrides):
    return load_config(QUICKSTART, list(overrides))


def test_grad_accum_is_global_over_micro_times_workers():
    d = derive_stage(cfg("pretrain.train.global_batch_size=64", "pretrain.train.micro_batch_size=4"), "pretrain")
    assert d.grad_accum == 8 and d.samples_per_rank == 32 and d.tokens_per_step == 64 * 128
    # a resume on 4 workers keeps the global batch and halves the accumulation
    d4 = derive_stage(cfg("pretrain.train.global_batch_size=64", "pretrain.train.micro_batch_size=4",
                          "pretrain.data.lanes=4"), "pretrain", world_size=4)
    assert d4.grad_accum == 4 and d4.global_batch_size == 64


def test_indivisible_global_batch_is_named():
    with pytest.raises(ConfigError, match=r"global_batch_size=18 .* micro_batch_size \(4\) × workers \(2\) = 8"):
        derive_stage(cfg("pretrain.train.global_batch_size=18", "pretrain.train.micro_batch_size=4"), "pretrain")


def test_deepspeed_json_is_complete_and_consistent():
    d = derive_stage(cfg("pretrain.train.global_batch_size=32", "pretrain.train.micro_batch_size=4",
                         "pretrain.optim.grad_clip=0.5"), "pretrain")
    ds = d.deepspeed
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 120
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU without offload


def test_incompatible_deepspeed_options():
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        derive_stage(cfg("pretrain.deepspeed.offload_params=true"), "pretrain")
    with pytest.raises(ConfigError, match="offload_optimizer needs zero_stage >= 1"):
        derive_stage(cfg("pretrain.deepspeed.zero_stage=0", "pretrain.deepspeed.offload_optimizer=true"), "pretrain")


def test_lanes_must_divide_by_workers():
    with pytest.raises(ConfigError, match="lanes=3 is not divisible by the 2 workers"):
        derive_stage(cfg("pretrain.data.lanes=3", "pretrain.train.global_batch_size=48"), "pretrain")


def test_missing_stage():
    with pytest.raises(ConfigError, match="stage 'pretrain' is not configured"):
        derive_stage(cfg("pretrain=null"), "pretrain")
