import re
from pathlib import Path

import pytest

from dist_train.config.loader import ConfigError, apply_override, from_dict, load_config, to_dict
from dist_train.config.schema import RunConfig

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_quickstart_loads_with_documented_names():
    cfg = load_config(QUICKSTART)
    assert cfg.ray.num_workers == 2
    assert cfg.pretrain.deepspeed.zero_stage == 2
    assert cfg.pretrain.deepspeed.precision == "auto"
    assert cfg.finetune.train.gradient_checkpointing == "auto"  # the memory plan decides on the workers
    assert cfg.finetune.data.group_by_length and cfg.finetune.data.packing is False and cfg.finetune.train.chunked_loss


def test_gradient_checkpointing_takes_auto_true_or_false_and_nothing_else():
    on = load_config(QUICKSTART, ["finetune.train.gradient_checkpointing=true"])
    off = load_config(QUICKSTART, ["pretrain.train.gradient_checkpointing=false"])
    assert on.finetune.train.gradient_checkpointing is True and off.pretrain.train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match=r"gradient_checkpointing = 1 \(int\) is not one of \['auto', True, False\]"):
        load_config(QUICKSTART, ["pretrain.train.gradient_checkpointing=1"])


def test_overrides_reach_every_field_and_parse_types():
    cfg = load_config(QUICKSTART, ["pretrain.train.max_steps=7", "pretrain.optim.lr=3e-4", "ray.use_gpu=true",
                                   "ray.address=null", "output_dir=/tmp/x", "finetune=null"])
    assert cfg.pretrain.train.max_steps == 7
    assert cfg.pretrain.optim.lr == pytest.approx(3e-4)
    assert cfg.ray.use_gpu is True and cfg.ray.address is None
    assert cfg.output_dir == "/tmp/x" and cfg.finetune is None


def test_yaml_1_1_exponent_without_dot_is_accepted(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pretrain:\n  data: {shards: x}\n  optim: {lr: 3e-4}\n")  # YAML 1.1 reads 3e-4 as a string
    assert load_config(p).pretrain.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("override, message", [
    ("pretrain.train.max_step=3", "did you mean 'pretrain.train.max_steps'"),
    ("seeds=1", "did you mean 'seed'"),
    ("pretrain.train.max_steps=ten", "must be an integer"),
    ("pretrain.train.max_steps=2.5", "must be an integer"),
    ("pretrain.train.max_steps=0", "must be >= 1"),
    ("pretrain.optim.lr=-1.0", "must be > 0"),
    ("pretrain.deepspeed.zero_stage=4", "must be <= 3"),
    ("pretrain.deepspeed.precision=bf61", "did you mean 'bf16'"),
    ("finetune.task=classification", "did you mean 'sequence_classification'"),  # the meaning, not the spelling
    ("finetune.task=token", "did you mean 'token_classification'"),
    ("ray.use_gpu=yes please", "must be true or false"),
    ("ray=3", "must be a mapping"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        load_config(QUICKSTART, [override])
    assert "\n" not in str(err.value)


def test_unknown_section_key_suggests_full_path():
    with pytest.raises(ConfigError, match=r"'max_stepz'.*did you mean 'pretrain\.train\.max_steps'"):
        from_dict({"max_stepz": 3})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required config key 'pretrain\.data\.shards'"):
        from_dict({"pretrain": {"data": {"seq_len": 16}}})


def test_override_syntax_error():
    with pytest.raises(ConfigError, match=r"a\.b\.c=value"):
        apply_override({}, "pretrain.train.max_steps")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_plain_dict():
    cfg = load_config(QUICKSTART)
    assert from_dict(to_dict(cfg)) == cfg
    assert to_dict(RunConfig())["ray"]["num_workers"] == 2


def test_a_partial_section_overrides_its_place_specific_defaults():
    from dist_train.config.loader import load_config

    cfg = load_config(None, ["finetune.data.train=x.jsonl", "finetune.train.max_steps=7", "finetune.optim.lr=1e-3"])
    assert cfg.finetune.train.export == "best" and cfg.finetune.train.gradient_checkpointing == "auto"
    assert cfg.finetune.train.max_steps == 7 and cfg.finetune.optim.lr == 1e-3
    assert cfg.finetune.optim.weight_decay == 0.01  # the finetune default, not the pretrain one (0.1)


def test_references_follow_an_overridden_key():
    cfg = load_config(QUICKSTART, ["prepare.dir=/shared/qs"])
    assert cfg.model.tokenizer == "/shared/qs/tokenizer"
    assert cfg.pretrain.data.shards == "/shared/qs/shards"
    assert cfg.finetune.data.test == "/shared/qs/task/test.jsonl"
    # A bare reference keeps the referenced value's type.
    assert load_config(QUICKSTART, ["ray.cpus_per_worker=${ray.num_workers}"]).ray.cpus_per_worker == 2


@pytest.mark.parametrize(("override", "message"), [
    ("model.tokenizer=${nope.x}", "model.tokenizer: ${nope.x} refers to a key this config does not set: set nope.x"),
    ("prepare.dir=${model.tokenizer}", "forms a cycle (model.tokenizer -> prepare.dir -> model.tokenizer)"),
])
def test_bad_references_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(QUICKSTART, [override])


def test_relative_outputs_are_refused_only_inside_a_ray_job_working_dir():
    from dist_train.launch.driver import check_job_paths

    cfg = load_config(QUICKSTART)
    job_dir = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc"
    check_job_paths(cfg, cwd="/home/me/project")  # an ordinary shell: relative is fine
    with pytest.raises(ConfigError, match=r"output_dir='runs/quickstart' is relative.*output_dir=/an/absolute/path"):
        check_job_paths(cfg, cwd=job_dir)
    with pytest.raises(ConfigError, match=r"prepare.dir='data/quickstart' is relative"):
        check_job_paths(load_config(QUICKSTART, ["output_dir=/shared/run"]), cwd=job_dir)
    check_job_paths(load_config(QUICKSTART, ["output_dir=/shared/run", "prepare.dir=/shared/qs"]), cwd=job_dir)


def test_print_config_shows_the_deepspeed_json_each_stage_gets(capsys):
    import json

    from dist_train.cli import main

    assert main(["print-config", str(QUICKSTART), "--deepspeed", "pretrain.deepspeed.extra={comms_logger: "
                                                                 "{enabled: true}}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) == {"pretrain", "finetune"}
    assert shown["pretrain"]["comms_logger"] == {"enabled": True}  # your keys, merged
    assert shown["finetune"]["train_batch_size"] == load_config(QUICKSTART).finetune.train.global_batch_size
    assert main(["print-config", str(QUICKSTART), "--deepspeed", "--stage", "finetune"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"finetune"}
