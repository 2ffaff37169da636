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
                         "pretrain.optim.grad_clip=0.5", "pretrain.deepspeed.precision=bf16"), "pretrain")
    ds = d.deepspeed
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 120
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    assert ds["zero_optimization"]["reduce_bucket_size"] == 25_000_000  # the floor: hidden 128 is tiny
    offload = derive_stage(cfg("pretrain.deepspeed.offload_optimizer=true"), "pretrain").deepspeed
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeed's CPU Adam steps offloaded states
    own = derive_stage(cfg("pretrain.deepspeed.extra={optimizer: {params: {torch_adam: false}}}"), "pretrain")
    assert own.deepspeed["optimizer"]["params"]["torch_adam"] is False
    assert "fused" not in own.deepspeed["optimizer"]["params"]  # torch's argument; DeepSpeed's FusedAdam refuses it


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


def test_users_deepspeed_json_adds_keys_and_auto_takes_the_typed_value(tmp_path):
    import json

    from dist_train.config.checks import resolve_paths

    user = {"zero_optimization": {"stage": "auto", "reduce_bucket_size": 1000, "stage3_max_live_parameters": 5},
            "bf16": {"enabled": True}, "train_batch_size": "auto", "fp16": {"loss_scale_window": 50}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    c = resolve_paths(cfg(f"pretrain.deepspeed.config_file={path}",
                          "pretrain.deepspeed.extra={wall_clock_breakdown: true}"))
    ds = derive_stage(c, "pretrain").deepspeed
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 16
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # ours was a default: the user's wins
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 5 and ds["wall_clock_breakdown"] is True
    assert ds["fp16"]["loss_scale_window"] == 50 and ds["fp16"]["initial_scale_power"] == 16
    assert c.pretrain.deepspeed.config_file == str(path)  # recorded, and its contents travel to the workers


@pytest.mark.parametrize("user, message", [
    ({"zero_optimization": {"stage": 3}}, r"sets zero_optimization.stage=3 but the typed config gives 2 "
                                          r"\(from pretrain.deepspeed.zero_stage\)"),
    ({"train_batch_size": 64}, r"train_batch_size=64 but the typed config gives 16 \(from pretrain.train.global"),
    ({"optimizer": {"params": {"lr": 0.1}}}, r"optimizer.params.lr=0.1 but the typed config gives 0.002"),
    ({"fp16": {"enabled": True}}, r"fp16.enabled=true but the typed config gives false \(from pretrain.deepspeed.prec"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     r"offload_optimizer=.* which the typed config leaves off \(pretrain.deepspeed.offload_optimizer\)"),
])
def test_a_conflict_with_the_typed_config_names_both_values(tmp_path, user, message):
    import json

    from dist_train.config.checks import resolve_paths

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=message):
        # an explicit precision: `auto` would follow the JSON's fp16 (test_precision.py)
        derive_stage(resolve_paths(cfg(f"pretrain.deepspeed.config_file={path}", "pretrain.deepspeed.precision=bf16")),
                     "pretrain")


def test_a_missing_or_broken_deepspeed_file_is_named(tmp_path):
    from dist_train.config.checks import resolve_paths

    with pytest.raises(ConfigError, match=r"pretrain.deepspeed.config_file='nope.json' not found"):
        resolve_paths(cfg("pretrain.deepspeed.config_file=nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(ConfigError, match=r"is not valid JSON .*: fix the file"):
        resolve_paths(cfg(f"finetune.deepspeed.config_file={bad}"))
    with pytest.raises(ConfigError, match=r"extra = 3 \(int\) must be a mapping"):
        cfg("pretrain.deepspeed.extra=3")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_every_schedule_builds_in_deepspeed_even_without_warmup(schedule):
    """DeepSpeed's own scheduler classes accept what we render; warmup 0 starts at the full rate (cosine)."""
    import torch
    from deepspeed.runtime import lr_schedules

    from dist_train.config.derived import _scheduler
    from dist_train.config.schema import OptimConfig

    for warmup in (0, 5):
        rendered = _scheduler(OptimConfig(lr=1e-3, warmup_steps=warmup, schedule=schedule), max_steps=20)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = getattr(lr_schedules, rendered["type"])(opt, **rendered["params"])
        sched.step()  # (DeepSpeed's schedulers give the very first step the rate of iteration -1: 0)
        if schedule == "cosine" and warmup == 0:
            assert sched.get_lr()[0] == pytest.approx(1e-3), "no warmup: at the full rate from then on"
