"""What adaptation bought, end to end through real Ray Train and DeepSpeed: continued pretraining of a
"pretrained" causal LM with general-domain replay, evaluated per set from step 0; standard benchmarks
(lm-evaluation-harness, a local multiple-choice task) on the starting model and the export; a fine-tune
compared with the unadapted model's by a paired bootstrap; the report page."""

import importlib
import inspect
import json
import math

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import run_cli, small_shards

pytestmark = pytest.mark.integration

GENERAL_MODULES = ["logging", "argparse", "unittest", "collections", "itertools", "functools", "typing",
                   "dataclasses", "enum", "datetime", "calendar", "heapq", "bisect", "pprint", "contextlib",
                   "traceback", "warnings", "doctest", "timeit", "operator", "copy", "inspect", "abc", "gettext"]
MC = [("Which module reads and writes JSON?", [" json", " socket", " math"], 0),
      ("Which module opens network connections?", [" json", " socket", " math"], 1),
      ("Which module computes square roots?", [" json", " socket", " math"], 2),
      ("Which module runs threads?", [" threading", " csv", " re"], 0),
      ("Which module parses CSV files?", [" threading", " csv", " re"], 1),
      ("Which module matches regular expressions?", [" threading", " csv", " re"], 2)]


def general_docs() -> list[str]:
    """Docstrings of standard-library modules the quickstart corpus leaves out: text of another domain."""
    docs = []
    for name in GENERAL_MODULES:
        mod = importlib.import_module(name)
        docs += [inspect.getdoc(getattr(mod, m)) or "" for m in sorted(dir(mod)) if not m.startswith("_")]
    return [d for d in dict.fromkeys(docs) if len(d.split()) > 5]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, corpus_jsonl, tokenizer_dir, shards_dir, task_dir):
    root = tmp_path_factory.mktemp("adapt")
    docs = general_docs()
    (root / "general.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    general = small_shards(root / "general", root / "general.jsonl", tokenizer_dir)
    (root / "other.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[::3]))
    # the "pretrained" starting model: a small Llama saved as a Hugging Face directory
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = root / "start"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(start)
    tok.save_pretrained(start)
    tasks = root / "lm_tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                            for q, c, a in MC))
    (tasks / "stdlib_mc.yaml").write_text(yaml.safe_dump({
        "task": "stdlib_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "mc.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    config = {
        "output_dir": str(root / "run"), "seed": 0, "ray": {"num_workers": 2, "cpus_per_worker": 1},
        "model": {"name_or_path": str(start)},
        "pretrain": {
            "objective": "clm",
            "data": {"shards": str(shards_dir), "seq_len": 32, "mix": [{"shards": str(general), "weight": 0.25}]},
            "eval": {"samples": 24, "max_forgetting": 0.5,
                     "sets": [{"name": "domain", "path": str(shards_dir)},
                              {"name": "general", "path": str(general), "role": "general"},
                              {"name": "other", "path": str(root / "other.jsonl"), "role": "general"}],
                     "lm_eval": {"tasks": ["stdlib_mc"], "include_path": str(tasks), "batch_size": 4}},
            "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            "optim": {"lr": 3.0e-3, "warmup_steps": 2},
            "train": {"max_steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 6,
                      "eval_every": 6, "save_every": 6}},
        "finetune": {
            "task": "sequence_classification", "init_from": "pretrain", "compare_base": True,
            "data": {"train": str(task_dir / "train.jsonl"), "validation": str(task_dir / "validation.jsonl"),
                     "test": str(task_dir / "test.jsonl"), "max_length": 48},
            "deepspeed": {"zero_stage": 2, "precision": "bf16"},
            "optim": {"lr": 1.0e-3, "warmup_steps": 2},
            "train": {"max_steps": 8, "global_batch_size": 16, "micro_batch_size": 8, "gradient_checkpointing": False,
                      "log_every": 4, "eval_every": 4, "save_every": 4}}}
    path = root / "adapt.yaml"
    path.write_text(yaml.safe_dump(config))
    res = run_cli("run", str(path), cwd=root, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    return root, json.loads((root / "run" / "report.json").read_text()), res.stdout


def independent_loss(model_dir, shards, samples: int) -> float:
    """The causal-LM loss of a Hugging Face model on the first `samples` held-out samples, computed here
    with plain transformers: what the step-0 baseline must equal."""
    from transformers import AutoModelForCausalLM

    from dist_train.data.evalsets import read_samples, set_size
    from dist_train.data.manifest import read_manifest

    man = read_manifest(shards)
    size = set_size(man, samples)
    rows = np.stack([row for _, row in read_samples(man, set(range(size)), size)]).astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows)).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   torch.from_numpy(rows[:, 1:]).reshape(-1)))


def test_baseline_is_the_starting_model_and_forgetting_is_measured_on_the_general_sets(adapted, shards_dir):
    root, report, stdout = adapted
    pre = report["stages"]["pretrain"]
    rows = [json.loads(line) for line in (root / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    baseline = rows[0]
    assert baseline["step"] == 0 and "loss" not in baseline and baseline["phase"].startswith("baseline")
    expected = independent_loss(root / "start", shards_dir, 24)
    assert baseline["eval_domain/loss"] == pytest.approx(expected, rel=1e-4)
    assert pre["baseline"]["domain/loss"] == baseline["eval_domain/loss"]
    assert pre["baseline"]["general/tokens"] == 24 * 31, "24 samples of 32 tokens, 31 predicted each"
    assert pre["baseline"]["other/tokens"] > 0, "the text corpus was packed with the stage's tokenizer"
    assert (root / "run" / "pretrain" / "eval_sets" / "other" / "manifest.json").is_file()

    adaptation = pre["adaptation"]
    assert adaptation["before_step"] == 0 and adaptation["after_step"] == 12 and adaptation["head_warmup_steps"] == 0
    sets = adaptation["sets"]
    assert {n: s["role"] for n, s in sets.items()} == {"domain": "domain", "general": "general", "other": "general"}
    for name in ("general", "other"):
        s = sets[name]
        assert s["before"]["perplexity"] == pytest.approx(pre["baseline"][f"{name}/perplexity"])
        assert s["forgetting"] == pytest.approx(s["after"]["perplexity"] / s["before"]["perplexity"] - 1)
    assert "forgetting" not in sets["domain"]
    assert sets["domain"]["change"]["perplexity_rel"] < 0, "12 steps on the domain lower its perplexity"
    assert adaptation["forgetting"] == max(sets["general"]["forgetting"], sets["other"]["forgetting"])
    last = rows[-1]
    assert last["eval_forgetting"] == pytest.approx(adaptation["forgetting"])
    assert adaptation["verdict"] in ("adapted", "forgetting") and "[pretrain] adaptation: domain perplexity" in stdout
    assert pre["best_metric"] == "adapted_loss"


def test_lm_eval_scores_the_starting_model_and_the_export(adapted):
    root, report, stdout = adapted
    lm = report["stages"]["pretrain"]["lm_eval"]
    assert set(lm) == {"start", "end"}
    for when in ("start", "end"):
        assert 0 <= lm[when]["stdlib_mc"]["acc"] <= 1 and "acc_stderr" in lm[when]["stdlib_mc"]
    assert "[pretrain] lm_eval end: stdlib_mc: acc " in stdout
    export = report["stages"]["pretrain"]["export_dir"]
    res = run_cli("eval", export, "--tasks", "stdlib_mc", "--include-path", str(root / "lm_tasks"),
                  "--output", str(root / "lm.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((root / "lm.json").read_text())["results"]["stdlib_mc"]["acc"] == lm["end"]["stdlib_mc"]["acc"]
    res = run_cli("eval", export, "--tasks", "no_such_task", "--include-path", str(root / "lm_tasks"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "'no_such_task' is not in the harness" in res.stderr


def test_compare_base_fine_tunes_both_and_gives_the_interval(adapted, task_dir):
    root, report, stdout = adapted
    ft = report["stages"]["finetune"]
    c = ft["compare_base"]
    assert (root / "run" / "finetune" / "export" / "config.json").is_file()
    assert (root / "run" / "compare_base" / "finetune" / "export" / "config.json").is_file()
    assert c["base_export_dir"] == str(root / "run" / "compare_base" / "finetune" / "export")
    assert c["metric"] == "accuracy" and c["adapted"] == pytest.approx(ft["test"]["accuracy"])
    assert c["base"] == pytest.approx(c["base_test"]["accuracy"])
    lo, hi = c["ci95"]
    assert lo <= hi and lo < c["difference"] + 0.2 and c["examples"] == ft["examples"]["test"]
    assert c["verdict"] in ("helped", "hurt", "no_clear_difference") and c["summary"] in stdout
    ckpts = root / "run" / "compare_base" / "finetune" / "checkpoints"
    base_cfg = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "meta.json").read_text())["config"]
    assert base_cfg["finetune"]["init_from"] is None and base_cfg["model"]["name_or_path"] == str(root / "start")
    same = ("seed", "ray")
    assert all(base_cfg[k] == report["config"][k] for k in same)
    assert {k: v for k, v in base_cfg["finetune"].items() if k != "init_from"} == {
        k: v for k, v in report["config"]["finetune"].items() if k != "init_from"}, "identical settings"


def test_report_page_shows_what_adaptation_bought(adapted):
    root, _, _ = adapted
    res = run_cli("report", str(root / "run"), "--html")
    assert res.returncode == 0, res.stderr
    page = (root / "run" / "report.md").read_text()
    assert "## What adaptation bought" in page and "![What adaptation bought](report/adaptation.png)" in page
    assert "| domain | domain |" in page and "| general | general |" in page
    assert "Fine-tuning, adapted against unadapted" in page and "stdlib_mc" in page
    png = (root / "run" / "report" / "adaptation.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000
    assert math.isfinite(json.loads((root / "run" / "report.json").read_text())["stages"]["finetune"]["compare_base"][
        "difference"])
