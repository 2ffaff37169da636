"""Expected user mistakes: one line naming the problem and the fix, exit 2, before Ray starts,
and nothing written to output_dir."""

from pathlib import Path

import pytest
import yaml

from dist_train.cli import main
from tests.conftest import run_cli


@pytest.fixture
def config(tmp_path, shards_dir, tokenizer_dir):
    task = tmp_path / "task.jsonl"
    task.write_text('{"text": "a b c", "label": "x"}\n{"text": "d e f", "label": "y"}\n' * 8)
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "ray": {"num_workers": 2},
        "model": {"tokenizer": str(tokenizer_dir), "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                            "intermediate_size": 64}},
        "pretrain": {"data": {"shards": str(shards_dir), "seq_len": 32},
                     "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}},
        "finetune": {"data": {"train": str(task)},
                     "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_user_error(capsys, argv, message, out_dir):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert not Path(out_dir).exists(), "nothing may be written for a rejected config"


def test_valid_config_validates(config, capsys):
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "grad_accum=1" in out and "config OK" in out


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.data.shards=/nonexistent/shards"], "does not exist"),
    (["pretrain.train.max_stepz=3"], "did you mean 'pretrain.train.max_steps'"),
    (["pretrain.train.max_steps=many"], "must be an integer"),
    (["pretrain.train.micro_batch_size=0"], "must be >= 1"),
    (["pretrain.train.global_batch_size=6"], "not divisible by micro_batch_size (2) × workers (2) = 4"),
    (["model.arch.vocab_size=100"], "has 512 tokens but the model embeds only 100"),
    (["pretrain.data.seq_len=64"], "hold samples of 32 tokens"),
    (["finetune.data.train=/nope.jsonl"], "not found"),
    (["finetune.init_from=/nope"], "not an HF model directory"),
    (["pretrain.deepspeed.offload_params=true"], "needs zero_stage 3"),
])
def test_run_rejects_bad_config_before_ray(config, capsys, overrides, message):
    out_dir = yaml.safe_load(config.read_text())["output_dir"]
    check_user_error(capsys, ["run", str(config), *overrides], message, out_dir)


def test_empty_corpus_dir(config, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    check_user_error(capsys, ["run", str(config), f"pretrain.data.shards={tmp_path / 'empty'}"],
                     "has no manifest.json", tmp_path / "run")


def test_output_dir_is_a_file(config, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert main(["run", str(config), f"output_dir={tmp_path / 'afile'}"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_data_build_glob_matching_nothing(capsys, tmp_path, tokenizer_dir):
    check_user_error(capsys, ["data", "build", "--input", str(tmp_path / "none" / "*.jsonl"), "--output",
                              str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--seq-len", "32"],
                     "matches no file", tmp_path / "out")


def test_real_cli_prints_one_line(config):
    res = run_cli("run", str(config), "pretrain.train.global_batch_size=6", timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "global_batch_size=6" in res.stderr


def test_resume_with_a_changed_identity_key_is_refused(config, capsys, tmp_path):
    import json

    from dist_train.config.checks import resolve_paths
    from dist_train.config.loader import load_config, to_dict

    old = to_dict(resolve_paths(load_config(config, ["seed=5"])))
    ckpt = tmp_path / "run" / "pretrain" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "step_00000002" / "meta.json").write_text(json.dumps({"config": old, "step": 2}))
    (ckpt / "latest").write_text("step_00000002\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "made with seed=5, but this config has 0" in err and "use a new output_dir" in err
    assert main(["validate", str(config), "seed=5", "pretrain.train.max_steps=9"]) == 0
    assert "pretrain will resume from step_00000002" in capsys.readouterr().out


@pytest.fixture
def finetune_config(config, minilm_dir):
    cfg = yaml.safe_load(config.read_text())
    cfg.update(pretrain=None, model={"name_or_path": str(minilm_dir)})
    cfg["finetune"]["init_from"] = None
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.parametrize("overrides, message", [
    (["finetune.lora.enabled=true", "finetune.lora.target_modules=[qkv]"],
     "finetune.lora.target_modules: 'qkv' is not a linear layer of this model: use some of"),
    (["finetune.task=sft", "finetune.data.prompt_field=text", "finetune.data.response_field=label"],
     "sft needs a tokenizer with an EOS token (responses end with it): use a decoder's tokenizer"),
    (["finetune.task=sft"], "has no field 'prompt'"),
    (["finetune.data.label_field=y"], "has no field 'y' (fields: ['text', 'label']): set the finetune.data field"),
    (["finetune.train.best_metric=f1"], "'f1' is not a metric the sequence_classification task reports"),
    (["finetune.data.validation_fraction=0.6"], "must be <= 0.5"),
    (["finetune.task=regression"], "is not a number: use numeric labels, or task sequence_classification"),
])
def test_finetune_mistakes_are_caught_before_ray(finetune_config, capsys, overrides, message):
    out_dir = yaml.safe_load(finetune_config.read_text())["output_dir"]
    check_user_error(capsys, ["run", str(finetune_config), *overrides], message, out_dir)
