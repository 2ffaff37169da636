"""Expected user mistakes: one line naming the problem and the fix, exit 2, before Ray starts,
and nothing written to output_dir."""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dist_train.cli import main
from tests.conftest import REPO, run_cli


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


@dataclass(frozen=True)
class Case:
    """One expected mistake: the overrides that make it (after `setup`, which may prepare files and
    return further overrides), and the words the one-line error must contain."""

    mistake: str
    overrides: tuple[str, ...]
    message: str
    setup: Callable[[Path], list[str]] | None = None
    finetune_only: bool = False  # on the MiniLM fine-tune config instead of the tiny two-stage one
    example: str = ""  # for the docs, when `setup` makes the mistake


def _empty_dir(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return [f"pretrain.data.shards={tmp / 'empty'}"]


def _file_as_output(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"output_dir={tmp / 'afile' / 'run'}"]


def _remote_code_model(tmp: Path) -> list[str]:
    model = tmp / "custom_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {
        "AutoConfig": "modeling_custom.CustomConfig"}}))
    return ["model.arch=null", f"model.name_or_path={model}", "pretrain=null", f"finetune.init_from={model}"]


def _task_file(tmp: Path, data: bytes) -> list[str]:
    (tmp / "bad_task.jsonl").write_bytes(data)
    return [f"finetune.data.train={tmp / 'bad_task.jsonl'}"]


def _deepspeed_file(content: str | None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "ds.json"
        if content is not None:
            path.write_text(content)
        return [f"pretrain.deepspeed.config_file={path}"]
    return setup


CASES = [
    Case("shard directory missing", ("pretrain.data.shards=/nonexistent/shards",), "does not exist"),
    Case("shard directory without a manifest", (), "has no manifest.json", setup=_empty_dir,
         example="pretrain.data.shards=an empty directory"),
    Case("misspelled key", ("pretrain.train.max_stepz=3",), "did you mean 'pretrain.train.max_steps'"),
    Case("misspelled top-level key", ("outptu_dir=x",), "did you mean 'output_dir'"),
    Case("a ${reference} to a key the config does not set", ("output_dir=${paths.runs}/x",),
         "${paths.runs} refers to a key this config does not set"),
    Case("${references} that form a cycle", ("output_dir=${seed}", "seed=${output_dir}"), "forms a cycle"),
    Case("text where a number belongs", ("pretrain.train.max_steps=many",), "must be an integer"),
    Case("text where true/false belongs", ("ray.use_gpu=maybe",), "must be true or false"),
    Case("a choice that does not exist", ("pretrain.deepspeed.precision=bf17",), "did you mean 'bf16'"),
    Case("zero batch size", ("pretrain.train.micro_batch_size=0",), "must be >= 1"),
    Case("ZeRO stage out of range", ("pretrain.deepspeed.zero_stage=4",), "must be <= 3"),
    Case("negative learning rate", ("pretrain.optim.lr=-1.0",), "must be > 0"),
    Case("batch not divisible over workers", ("pretrain.train.global_batch_size=6",),
         "not divisible by micro_batch_size (2) × workers (2) = 4"),
    Case("parameter offload without ZeRO-3", ("pretrain.deepspeed.offload_params=true",), "needs zero_stage 3"),
    Case("optimizer offload without ZeRO",
         ("pretrain.deepspeed.zero_stage=0", "pretrain.deepspeed.offload_optimizer=true"), "needs zero_stage >= 1"),
    Case("fp16 on a CPU without fp16 kernels", ("pretrain.deepspeed.precision=fp16",), "needs native fp16 kernels"),
    Case("your DeepSpeed JSON is missing", (), "not found: give the path of a DeepSpeed JSON file",
         setup=_deepspeed_file(None), example="pretrain.deepspeed.config_file=a missing file"),
    Case("your DeepSpeed JSON is not JSON", (), "is not valid JSON", setup=_deepspeed_file("{stage: 3"),
         example="ds.json holds {stage: 3"),
    Case("your DeepSpeed JSON contradicts the config", (),
         "sets zero_optimization.stage=3 but the typed config gives 2 (from pretrain.deepspeed.zero_stage)",
         setup=_deepspeed_file('{"zero_optimization": {"stage": 3}}'), example="ds.json sets stage 3, the config 2"),
    Case("vocabulary larger than the embedding", ("model.arch.vocab_size=100",),
         "has 512 tokens but the model embeds only 100"),
    Case("seq_len differs from the shards", ("pretrain.data.seq_len=64",), "hold samples of 32 tokens"),
    Case("seq_len beyond the model's positions", ("model.arch.max_position_embeddings=16",),
         "exceeds model.arch.max_position_embeddings=16"),
    Case("both a pretrained model and an inline one", ("model.name_or_path=/some/model",), "set exactly one of"),
    Case("nothing to run", ("pretrain=null", "finetune=null"), "no stage to run"),
    Case("tokenizer missing", ("model.tokenizer=/nonexistent/tok",), "cannot load tokenizer"),
    Case("output_dir under a file", (), "is a file, not a directory", setup=_file_as_output,
         example="output_dir=afile/run"),
    Case("labeled data missing", ("finetune.data.train=/nope.jsonl",), "not found"),
    Case("init_from is not a model", ("finetune.init_from=/nope",), "not an HF model directory"),
    Case("a model that ships code, untrusted", (), "set model.trust_remote_code=true only if you trust",
         setup=_remote_code_model, example="model.name_or_path=a directory whose config.json has an auto_map"),
    Case("fault injection outside tests", ("faults.kill_at_steps=[3]",), "injects failures on purpose"),
    Case("LoRA on a layer that does not exist", ("finetune.lora.enabled=true", "finetune.lora.target_modules=[qkv]"),
         "finetune.lora.target_modules: 'qkv' is not a linear layer of this model: use some of", finetune_only=True),
    Case("SFT with an encoder tokenizer",
         ("finetune.task=sft", "finetune.data.prompt_field=text", "finetune.data.response_field=label"),
         "sft needs a tokenizer with an EOS token (responses end with it): use a decoder's tokenizer",
         finetune_only=True),
    Case("SFT data without prompts", ("finetune.task=sft",), "has no field 'prompt'", finetune_only=True),
    Case("packing a task that is not SFT", ("finetune.data.packing=true",),
         "finetune.data.packing=true packs causal-LM examples, and task 'sequence_classification' is not one",
         finetune_only=True),
    Case("packing a model whose remote code may ignore positions",
         ("finetune.task=sft", "finetune.data.packing=true", "model.trust_remote_code=true"),
         "remote code may ignore (examples would see each other): set packing to false", finetune_only=True),
    Case("labels missing from the data", ("finetune.data.label_field=y",),
         "has no field 'y' (fields: ['text', 'label']): set the finetune.data field", finetune_only=True),
    Case("best_metric the task does not report", ("finetune.train.best_metric=f1",),
         "'f1' is not a metric the sequence_classification task reports", finetune_only=True),
    Case("validation split too large", ("finetune.data.validation_fraction=0.6",), "must be <= 0.5",
         finetune_only=True),
    Case("regression on text labels", ("finetune.task=regression",),
         "is not a number: use numeric labels, or task sequence_classification", finetune_only=True),
    Case("two evaluation sets of one name",
         ("pretrain.eval.sets=[{name: domain, path: /a.jsonl}, {name: domain, path: /b.jsonl}]",),
         "pretrain.eval.sets[1] and pretrain.eval.sets[0] both give an evaluation set named 'domain'"),
    Case("an evaluation set that does not exist", ("pretrain.eval.sets=[{name: legal, path: /nope/legal.jsonl}]",),
         "pretrain.eval.sets[0]: '/nope/legal.jsonl' matches no file: fix its path"),
    Case("a non-finite number", ("pretrain.eval.max_forgetting=.nan",), "must be a finite number"),
    Case("evaluation sets without a domain set",
         ("pretrain.eval.sets=[{name: web, path: /a.jsonl, role: general}]",), "has no set with role: domain"),
    Case("stop on forgetting with nothing to measure it", ("pretrain.eval.stop_on_forgetting=true",),
         "pretrain.eval.stop_on_forgetting needs a general evaluation set"),
    Case("adapted_loss without a general set", ("pretrain.train.best_metric=adapted_loss",),
         "best_metric=adapted_loss ranks by domain loss within the forgetting limit"),
    Case("benchmarks on a masked LM", ("pretrain.objective=mlm", "model.arch.family=bert",
                                       "pretrain.eval.lm_eval.tasks=[hellaswag]"),
         "pretrain.eval.lm_eval scores causal LMs"),
    Case("compare_base without test data", ("finetune.compare_base=true",),
         "finetune.compare_base compares the two fine-tunes on the test set, and there is none"),
    Case("labeled data not UTF-8", (), "cannot be read", setup=lambda t: _task_file(t, b"\xff\xfe\x00\x80 bad\n"),
         example="train.jsonl holds bytes that are not UTF-8"),
    Case("labeled data with a line that is not JSON", (), "cannot be read",
         setup=lambda t: _task_file(t, b'{"text": "a", "label": "x"}\n{"text": "b", "lab\n'),
         example="train.jsonl's second line is cut off"),
    Case("labeled data of zero bytes", (), "every matched file is empty", setup=lambda t: _task_file(t, b""),
         example="train.jsonl is empty"),
    Case("a record without its label", (), "has an empty 'label'",
         setup=lambda t: _task_file(t, b'{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n'),
         example='a record has "label": null'),
    Case("negative validation fraction", ("finetune.data.validation_fraction=-0.1",), "must be >= 0"),
    Case("zero steps", ("pretrain.train.max_steps=0",), "must be >= 1"),
    Case("negative checkpoint interval", ("pretrain.train.save_every=-5",), "must be >= 0"),
    Case("non-finite patience of zero", ("pretrain.train.nonfinite_patience=0",), "must be >= 1"),
    Case("flash attention without a GPU", ("model.attention=flash_attention_2",),
         "model.attention=flash_attention_2 needs CUDA GPUs: set ray.use_gpu=true"),
    Case("an attention kernel transformers lacks", ("model.attention=flex",), "model.attention"),
    Case("compare_base against itself", ("finetune.compare_base=true", "finetune.data.test_fraction=0.2"),
         "but finetune.init_from already starts from the unadapted one", finetune_only=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.mistake for c in CASES])
def test_mistakes_are_one_line_errors_before_ray(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("DIST_TRAIN_ALLOW_FAULTS", raising=False)
    if "without fp16 kernels" in case.mistake:  # CPUs with AMX-FP16 have them: this case is about those without
        monkeypatch.setattr("dist_train.config.checks.cpu_has_fp16", lambda: False)
    config = request.getfixturevalue("finetune_config" if case.finetune_only else "config")
    extra = case.setup(tmp_path) if case.setup else []
    check_user_error(capsys, ["run", str(config), *case.overrides, *extra], case.message,
                     yaml.safe_load(config.read_text())["output_dir"])


ERRORS_DOC = REPO / "docs" / "errors.md"


def render_errors_doc() -> str:
    """docs/errors.md from CASES: `python -m tests.unit.test_bad_input` rewrites it."""
    from tests.unit.test_bad_commands import CLI_CASES

    rows = [f"| {c.mistake} | {' '.join(f'`{o}`' for o in c.overrides) or c.example} | …{c.message}… |"
            for c in CASES]
    commands = [f"| `{c.command}` | {c.mistake} | …{c.message.replace('|', '/')}… |" for c in CLI_CASES]
    return (ERRORS_DOC_HEAD + "\n".join(rows) + "\n" + ERRORS_DOC_COMMANDS + "\n".join(commands) + "\n"
            + ERRORS_DOC_TAIL)


ERRORS_DOC_HEAD = """# Mistakes and what dist-train says

Every mistake below is caught by `dist-train validate` and `dist-train run` before Ray starts: one
line on stderr that names the problem and the fix, exit status 2, and nothing written to
output_dir. The table is generated from the test matrix in tests/unit/test_bad_input.py
(`python -m tests.unit.test_bad_input`), and a test fails when the two differ. The overrides are
applied to a small two-stage config (the last rows: to a MiniLM fine-tune config).

| Mistake | Example | The error contains |
|---|---|---|
"""

ERRORS_DOC_COMMANDS = """
## Every other command

The same promise for the commands around training, on damaged or hostile input (the matrix in
tests/unit/test_bad_commands.py): one line, exit status 2, no traceback, and nothing of yours
changed. A refused output path is never deleted or replaced: dist-train replaces only what it
made itself ([reliability.md](reliability.md)).

| Command | Mistake | The error contains |
|---|---|---|
"""

ERRORS_DOC_TAIL = """
## Data problems found while training

Shards are checked as they stream (tests/unit/test_bad_data.py): a truncated shard, a shard whose
bytes no longer match the manifest's sha256, samples of the wrong length or dtype, and members
that are pickles (refused, never decoded) each stop the run with the shard and member named under
`pretrain.data.on_bad_sample: error`, or are replaced and counted under `skip`.

## Failures while training

See [reliability.md](reliability.md): a full, read-only or vanished checkpoint directory stops
training on every rank with the cause and the intact previous checkpoint named; a stopped rank is
named by the heartbeat.
"""


def test_errors_doc_is_current():
    from tests.unit.test_bad_commands import CLI_CASES

    assert len(CASES) + len(CLI_CASES) >= 100
    assert ERRORS_DOC.read_text() == render_errors_doc(), "regenerate: python -m tests.unit.test_bad_input"


if __name__ == "__main__":
    ERRORS_DOC.write_text(render_errors_doc())


@pytest.fixture
def finetune_config(config, minilm_dir):
    cfg = yaml.safe_load(config.read_text())
    cfg.update(pretrain=None, model={"name_or_path": str(minilm_dir)})
    cfg["finetune"]["init_from"] = None
    config.write_text(yaml.safe_dump(cfg))
    return config


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

    from dist_train.config.checks import resolve_paths, resolve_precision
    from dist_train.config.loader import load_config, to_dict

    old = to_dict(resolve_precision(resolve_paths(load_config(config, ["seed=5"]))))  # as a worker writes it
    ckpt = tmp_path / "run" / "pretrain" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "step_00000002" / "meta.json").write_text(json.dumps({"config": old, "step": 2}))
    (ckpt / "latest").write_text("step_00000002\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "made with seed=5, but this config has seed=0" in err and "use a new output_dir" in err
    assert main(["validate", str(config), "seed=5", "pretrain.train.max_steps=9"]) == 0
    assert "pretrain will resume from step_00000002" in capsys.readouterr().out




@pytest.mark.parametrize("key,value", [("finetune.task", "multi_label_classification"),
                                       ("finetune.deepspeed.precision", "fp32"), ("finetune.lora.enabled", "true"),
                                       ("finetune.data.label_field", "y"), ("finetune.init_from", "null"),
                                       ("pretrain.objective", "mlm")])
def test_resume_refuses_a_checkpoint_that_means_something_else(key, value, tmp_path):
    """A finished fine-tune rerun with another task (or precision, adapters, label field, starting weights,
    objective) would resume a checkpoint made for something else: refused, naming the key and both values."""
    import json

    from dist_train.config.checks import check_resume, resolve_paths
    from dist_train.config.loader import ConfigError, load_config, to_dict

    qs = str(REPO / "configs" / "quickstart.yaml")
    cfg = resolve_paths(load_config(qs, [f"output_dir={tmp_path}"]))
    stage = key.split(".")[0]
    ckpt = tmp_path / stage / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"config": to_dict(cfg), "step": 2}))
    (ckpt.parent / "latest").write_text("step_00000002\n")
    assert check_resume(cfg, stage) == "step_00000002"
    changed = resolve_paths(load_config(qs, [f"output_dir={tmp_path}", f"{key}={value}"]))
    was = json.dumps(_get(to_dict(cfg), key))
    with pytest.raises(ConfigError, match=re.escape(f"made with {key}={was}, but this config has {key}=")) as e:
        check_resume(changed, stage)
    assert "to resume it, restore" in str(e.value) and "\n" not in str(e.value)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _laughs(levels: int = 9) -> str:
    """A 'billion laughs' config: 9 aliases of 9 aliases ... of 9 strings (9**10 values once expanded)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"pretrain: {{deepspeed: {{extra: {{x: *a{levels}}}}}}}"]) + "\n"


@pytest.mark.parametrize("content,message", [(_laughs(), "expands to more than 100,000 values"),
                                             ("pretrain: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than"),
                                             ("a: [1, 2\n", "not valid YAML at line")])
@pytest.mark.parametrize("cmd", ["print-config", "validate", "run"])
def test_hostile_yaml_is_refused_before_it_is_expanded(tmp_path, capsys, cmd, content, message):
    """A 1 KB file must not exhaust memory (or the stack) in any command that reads a config."""
    import resource

    path = tmp_path / "hostile.yaml"
    path.write_text(content)
    check_user_error(capsys, [cmd, str(path)], message, tmp_path / "run")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 << 20, "under 4 GiB: nothing was expanded"


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "-1"], "--batch-size -1 must be >= 1"), (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--output", "{input}"], "is the input file"), (["--output", "{export}/p.jsonl"], "inside the model directory"),
    (["--output", "{export}"], "is a directory"), (["--output", "{tmp}/no/such/p.jsonl"], "does not exist"),
    (["--input", "{tmp}/missing.jsonl"], "is not a file")])
def test_predict_mistakes_are_one_line_and_touch_nothing(tmp_path, capsys, extra, message):
    """Refused before the model loads: nothing is written, the input is never overwritten."""
    export = tmp_path / "export"
    export.mkdir()
    records = tmp_path / "in.jsonl"
    records.write_text('{"text": "a", "label": "x"}\n')
    fill = {"input": str(records), "export": str(export), "tmp": str(tmp_path)}
    argv = ["predict", str(export), "--input", str(records), *[a.format(**fill) for a in extra]]
    if "--input" in extra:
        argv = ["predict", str(export), *[a.format(**fill) for a in extra]]
    check_user_error(capsys, argv, message, tmp_path / "nothing")
    assert records.read_text() == '{"text": "a", "label": "x"}\n' and sorted(p.name for p in export.iterdir()) == []


def test_a_class_only_the_test_data_has_is_noted_by_validate(config, capsys, tmp_path):
    """Not an error (the run is still meaningful), but said before the run: those examples count as wrong."""
    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "a b", "label": "x"}\n{"text": "q", "label": "zebra"}\n')
    assert main(["validate", str(config), f"finetune.data.test={test}"]) == 0
    out = capsys.readouterr().out
    assert "the test data has 1 label(s) the training data lacks ('zebra')" in out
