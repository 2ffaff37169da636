"""Two processes, gloo, real DeepSpeed ZeRO: checkpoint commit, exact resume, HF export."""

import json
import socket
from pathlib import Path

import pytest
import torch

from dist_train.config.loader import load_config, to_dict
from tests.dist import workers
from tests.dist.spawn import spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(tmp_path, shards_dir, tokenizer_dir, *overrides):
    base = [f"output_dir={tmp_path}", f"model.tokenizer={tokenizer_dir}", f"pretrain.data.shards={shards_dir}",
            "pretrain.data.seq_len=32", "model.arch.hidden_size=64", "model.arch.num_layers=2",
            "model.arch.num_heads=2", "model.arch.intermediate_size=128", "finetune=null", "prepare=null",
            "pretrain.train.global_batch_size=8", "pretrain.train.micro_batch_size=2", "pretrain.optim.warmup_steps=2",
            "pretrain.train.max_steps=10", "pretrain.deepspeed.precision=bf16"]  # the tier's precision everywhere
    return to_dict(load_config("configs/quickstart.yaml", base + list(overrides)))


@pytest.mark.parametrize("zero, precision, offload", [(2, "bf16", False), (1, "fp32", False), (3, "bf16", False),
                                                     (2, "bf16", True), (3, "fp32", True)])
def test_checkpoint_resume_is_exact_and_export_loads(tmp_path, shards_dir, tokenizer_dir, zero, precision, offload):
    cfg = tiny_config(tmp_path, shards_dir, tokenizer_dir, f"pretrain.deepspeed.zero_stage={zero}",
                      f"pretrain.deepspeed.precision={precision}", f"pretrain.deepspeed.offload_optimizer={offload}",
                      f"pretrain.deepspeed.offload_params={offload and zero == 3}")
    out = tmp_path / "result.json"
    spawn(workers.checkpoint_roundtrip, (2, free_port(), cfg, str(out)), 2)
    res = json.loads(out.read_text())
    assert res["first"][0] > res["after"][-1] - 5  # training ran and produced finite losses
    assert res["resumed"] == res["after"], "resumed steps must reproduce the uninterrupted ones exactly"
    assert res["same_params"] and res["rng_same"]
    # FLOPs per token (for MFU) count every matmul weight once, partitioned or not: 6·N + 12·L·H·T, where N
    # is the 2 layers' projections and the LM head (the tied embedding, once); norms and lookups cost nothing
    n = 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert res["fpt_engine"] == 6 * n + 12 * 2 * 64 * 32
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == res["tag"] == "step_00000003"
    meta = json.loads((ckpt / res["tag"] / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3 and "deepspeed" in meta["versions"]
    assert not [p for p in (ckpt / ".staging").iterdir() if p.is_dir()], "no uncommitted checkpoint left"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 17).unsqueeze(0)).logits
    engine_logits = torch.load(tmp_path / "engine_logits.pt")
    if precision == "fp32":  # the export computes exactly what the engine computed
        torch.testing.assert_close(logits, engine_logits, rtol=1e-5, atol=1e-5)
    else:  # the engine ran in bf16; the export holds the fp32 master weights
        torch.testing.assert_close(logits, engine_logits, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_worker_count_continues_training(tmp_path, shards_dir, tokenizer_dir, before, after):
    cfg = tiny_config(tmp_path, shards_dir, tokenizer_dir, "pretrain.deepspeed.precision=fp32",
                      "pretrain.data.lanes=2")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    spawn(workers.elastic_save, (before, free_port(), cfg, str(first)), before)
    spawn(workers.elastic_load, (after, free_port(), cfg, str(second)), after)
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert b["universal"] is True
    # same data plan and restored optimizer: the losses of steps 4-5 agree up to reduction order
    assert b["resumed"] == pytest.approx(a["after"], rel=1e-4)


def test_a_damaged_checkpoint_is_never_loaded(tmp_path, shards_dir, tokenizer_dir, capfd):
    cfg = tiny_config(tmp_path, shards_dir, tokenizer_dir)
    out = tmp_path / "r.json"
    spawn(workers.corrupt_fallback, (2, free_port(), cfg, str(out)), 2, fresh=True)  # capfd reads its ranks
    assert json.loads(out.read_text()) == {"tag": "step_00000002", "step": 2}
    assert "step_00000004 is damaged" in capfd.readouterr().out
    meta = json.loads((tmp_path / "ckpt" / "step_00000002" / "meta.json").read_text())
    assert all(len(f["sha256"]) == 64 for f in meta["files"].values()) and len(meta["files"]) >= 4


def test_masked_lm_resumes_exactly(tmp_path, encoder_shards, minilm_dir):
    from transformers import AutoModelForMaskedLM

    cfg = tiny_config(tmp_path, encoder_shards, minilm_dir, "pretrain.objective=mlm",
                      "pretrain.whole_word_masking=true", "model.arch.family=bert")
    out = tmp_path / "result.json"
    spawn(workers.checkpoint_roundtrip, (2, free_port(), cfg, str(out)), 2)
    res = json.loads(out.read_text())
    assert res["resumed"] == res["after"] and res["same_params"]
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "export")
    assert type(model).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_one_process_and_two_ranks_train_the_same(tmp_path, encoder_shards, minilm_dir, shards_dir, tokenizer_dir,
                                                  objective):
    """Token-weighted loss: masked positions fall unevenly over micro batches and ranks, yet a
    1-process run (micro batches of 4) and a 2-rank ZeRO-2 run (micro batches of 2) of the same
    global batch agree. A mean of per-micro-batch means would not."""
    shards, tok = (encoder_shards, minilm_dir) if objective == "mlm" else (shards_dir, tokenizer_dir)
    extra = ["pretrain.objective=mlm", "model.arch.family=bert", "pretrain.mlm_probability=0.3"] \
        if objective == "mlm" else []
    results = {}
    for world in (1, 2):
        cfg = tiny_config(tmp_path / str(world), shards, tok, "pretrain.deepspeed.precision=fp32",
                          "pretrain.data.lanes=2", "pretrain.optim.grad_clip=0.0", "model.dropout=0.0",
                          f"pretrain.train.micro_batch_size={4 // world}", *extra)
        out = tmp_path / f"w{world}.json"
        spawn(workers.train_with_loop, (world, free_port(), cfg, str(out)), world)
        results[world] = (json.loads(out.read_text())["losses"], torch.load(out.with_suffix(".pt")))
    (l1, p1), (l2, p2) = results[1], results[2]
    assert l1 == pytest.approx(l2, rel=1e-5)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-4, atol=1e-6)


def test_the_chunked_loss_trains_like_full_logits(tmp_path, shards_dir, tokenizer_dir):
    """ZeRO-3 (the head's weight partitioned and gathered for its forward), bf16, 2 ranks, the real loop: 4 steps
    through the chunked LM head and 4 through HF's full logits give the same losses, and weights apart by far
    less than either run moved them."""
    runs = {}
    for chunked in (True, False):
        cfg = tiny_config(tmp_path / str(chunked), shards_dir, tokenizer_dir, "pretrain.deepspeed.zero_stage=3",
                          f"pretrain.train.chunked_loss={str(chunked).lower()}", "model.dropout=0.0",
                          "pretrain.optim.lr=3e-3")
        out = tmp_path / f"chunked-{chunked}.json"
        spawn(workers.train_with_loop, (2, free_port(), cfg, str(out)), 2)
        runs[chunked] = (json.loads(out.read_text()), torch.load(out.with_suffix(".pt")),
                         torch.load(out.with_suffix(".init.pt")))
    (a, wa, start), (b, wb, _) = runs[True], runs[False]
    assert a["chunked_head"] and not b["chunked_head"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-2)
    moved = sum(float((wb[n] - start[n]).norm()) for n in start)
    apart = sum(float((wa[n] - wb[n]).norm()) for n in start)
    assert moved > 0 and apart < 0.1 * moved, (apart, moved)


@pytest.mark.parametrize("pretrained", [False, True])
def test_zero3_builds_the_model_partitioned(tmp_path, shards_dir, tokenizer_dir, encoder_shards, minilm_dir,
                                            pretrained):
    """Under ZeRO-3 no rank ever holds the whole model: parameters are split as they are created
    (random init) or loaded (pretrained MiniLM), before DeepSpeed wraps the model."""
    extra = [f"model.name_or_path={minilm_dir}", "model.arch=null", "pretrain.objective=mlm"] if pretrained else []
    cfg = tiny_config(tmp_path, encoder_shards if pretrained else shards_dir,
                      minilm_dir if pretrained else tokenizer_dir, "pretrain.deepspeed.zero_stage=3", *extra)
    out = tmp_path / "r.json"
    spawn(workers.partitioned_build, (2, free_port(), cfg, str(out)), 2)
    res = json.loads(out.read_text())
    assert res["all_partitioned"]
    assert res["held"] <= res["full"] / 2 + 2 * 64, "each of 2 ranks holds half the parameters (plus padding)"
    assert res["loss"] == res["loss"] and res["loss"] < 20
    if pretrained:
        assert res["pretrained_equal"]


def test_fp16_overflow_steps_are_skipped_counted_and_logged(tmp_path, shards_dir, tokenizer_dir):
    """fp16 with dynamic loss scaling, started at a scale too high for its gradients (2^30) through deepspeed.extra:
    the first steps overflow, are skipped and counted, the scale halves each time, and training
    then proceeds with finite losses."""
    cfg = tiny_config(tmp_path, shards_dir, tokenizer_dir, "pretrain.deepspeed.precision=fp16",
                      "pretrain.deepspeed.extra={fp16: {initial_scale_power: 30, hysteresis: 1}}")
    out = tmp_path / "fp16.json"
    spawn(workers.fp16_loop, (2, free_port(), cfg, str(out)), 2)
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert rows[0]["skipped_steps"] >= 1 and rows[0]["loss_scale"] < 2.0**30
    assert [r["skipped_steps"] for r in rows] == sorted(r["skipped_steps"] for r in rows)
    assert rows[-1]["skipped_steps"] < len(rows), "training must get past the overflows"
    assert all(r["loss"] == r["loss"] for r in rows)
    # hysteresis 1: each overflow halves the scale; it grows again only after 1000 clean steps
    assert rows[-1]["loss_scale"] == 2.0 ** (30 - rows[-1]["skipped_steps"])


def test_fp16_on_a_cpu_without_fp16_is_refused_before_ray(tmp_path):
    from dist_train.config.checks import check_run, resolve
    from dist_train.config.hardware import cpu_has_fp16
    from dist_train.config.loader import ConfigError

    if cpu_has_fp16():
        pytest.skip("this CPU has native fp16")
    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "pretrain.deepspeed.precision=fp16"])
    with pytest.raises(ConfigError, match=r"precision=fp16 needs native fp16 kernels, which this CPU lacks"):
        check_run(resolve(cfg), ["pretrain"])


@pytest.mark.parametrize("zero", [3, 2])
def test_lora_finetune_exports_reproduce_the_engine(tmp_path, task_dir, minilm_dir, zero):
    """LoRA on the real MiniLM under ZeRO-3 (and 2): only adapters and the head train; the merged
    export, loaded with plain transformers, scores the test file exactly as the engine did, and
    the adapter-only export (peft) gives the merged export's logits."""
    cfg = to_dict(load_config(None, [
        f"output_dir={tmp_path}", f"model.name_or_path={minilm_dir}", "finetune.init_from=null",
        f"finetune.data.train={task_dir}/train.jsonl", f"finetune.data.validation={task_dir}/test.jsonl",
        f"finetune.data.test={task_dir}/test.jsonl", "finetune.data.max_length=48", "finetune.lora.enabled=true",
        f"finetune.deepspeed.zero_stage={zero}", "finetune.deepspeed.precision=fp32", "finetune.optim.lr=1e-3",
        "finetune.train.global_batch_size=8", "finetune.train.micro_batch_size=2", "finetune.train.max_steps=4"]))
    out = tmp_path / "r.json"
    spawn(workers.finetune_export, (2, free_port(), cfg, str(out)), 2)
    res = json.loads(out.read_text())
    assert res["trainable"] < 0.05 * res["total"], "LoRA trains adapters and the head only"
    assert res["engine"]["accuracy"] == res["export"]["accuracy"]
    assert res["engine"]["loss"] == pytest.approx(res["export"]["loss"], rel=1e-4)
    assert res["adapter_vs_merged"] < 1e-4
    assert "adapter_model.safetensors" in res["adapter_files"] and "model.safetensors" in res["merged_files"]
    assert "adapter_config.json" not in res["merged_files"]


@pytest.mark.parametrize("zero", [2, 3])
def test_head_warmup_trains_only_the_new_head_then_everything(tmp_path, encoder_shards, minilm_dir, zero):
    """all-MiniLM-L6-v2 ships no masked-LM head: it is named, trained alone for the warm-up (the pretrained
    body bit for bit unchanged, under ZeRO-2 and ZeRO-3), then the body joins."""
    cfg = tiny_config(tmp_path, encoder_shards, minilm_dir, f"model.name_or_path={minilm_dir}", "model.arch=null",
                      "pretrain.objective=mlm", f"pretrain.deepspeed.zero_stage={zero}", "pretrain.eval.samples=8",
                      "pretrain.optim.lr=1.0e-3", "model.dropout=0.0")
    out = tmp_path / "r.json"
    spawn(workers.head_warmup, (2, free_port(), cfg, str(out)), 2)
    res = json.loads(out.read_text())
    assert "cls.predictions.transform.dense.weight" in res["new"] and "cls.predictions.bias" in res["new"]
    assert res["head_names"] and all(n.startswith("cls.predictions.") for n in res["head_names"])
    assert res["body_moved_in_warmup"] == [], "the pretrained body must not move while the head warms up"
    assert res["head_moved_in_warmup"] == res["head_names"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in res["body_moved_after"]
    assert res["groups"] == [False, False, True, True], "head groups first (the logged lr is the schedule's)"
    assert res["resumed_differs"] == [], "resumed inside the warm-up, it ends where the uninterrupted run does"
    assert res["evaluation"]["domain/loss"] > 9, "a random head predicts about ln(30522) = 10.3"


def test_evaluation_is_the_same_on_one_and_two_ranks(tmp_path, encoder_shards, minilm_dir):
    """An evaluation set is its first N samples, masks seeded by sample: 1 and 2 ranks (with a padded
    share: 7 samples) measure the same loss over the same tokens."""
    results = {}
    for world in (1, 2):
        cfg = tiny_config(tmp_path / str(world), encoder_shards, minilm_dir, f"model.name_or_path={minilm_dir}",
                          "model.arch=null", "pretrain.objective=mlm", "pretrain.deepspeed.precision=fp32",
                          "pretrain.eval.samples=7", "pretrain.train.global_batch_size=4",
                          f"pretrain.train.micro_batch_size={4 // world}")
        out = tmp_path / f"w{world}.json"
        spawn(workers.head_warmup, (world, free_port(), cfg, str(out)), world)
        results[world] = json.loads(out.read_text())["evaluation"]
    assert results[1]["domain/tokens"] == results[2]["domain/tokens"] > 0
    assert results[1]["domain/loss"] == pytest.approx(results[2]["domain/loss"], rel=1e-5)


def test_a_run_whose_loss_turns_nan_stops_and_saves_nothing_of_it(tmp_path, shards_dir, tokenizer_dir):
    """lr 1e30 (finite, so the config accepts it) blows the weights up after one step: the loop stops at the
    second non-finite step in a row on both ranks, and no step after the blow-up was saved."""
    cfg = tiny_config(tmp_path, shards_dir, tokenizer_dir, "pretrain.deepspeed.precision=fp32",
                      "pretrain.optim.lr=1e30", "pretrain.optim.warmup_steps=0")
    out = tmp_path / "r.json"
    spawn(workers.nonfinite_loop, (2, free_port(), cfg, str(out)), 2)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[0]["saved"] == ranks[1]["saved"], "the same step"
    res = ranks[0]
    assert res["refused"] and "NaN or infinite weights" in res["refused"] and not res["exported"], res
    assert res["error"] and "NaN or infinite for 2 consecutive step(s)" in res["error"], res
    first_bad = int(res["error"].split("(steps ")[1].split("-")[0])
    assert res["step"] == first_bad + 2 and res["saved"] == list(range(1, first_bad)), res
    assert res["at_end"] and "at the last 1 step(s)" in res["at_end"], "a stage ending on a NaN step fails too"


@pytest.mark.parametrize("objective, check_every_s", [("clm", 1e9), ("clm", 0.0), ("mlm", 1e9)])
def test_steps_between_checks_wait_for_no_all_reduce(tmp_path, shards_dir, tokenizer_dir, encoder_shards, minilm_dir,
                                                      objective, check_every_s):
    """A causal LM's target count is the same on every rank: its steps all-reduce nothing but at the checks (the
    first step, each log step, and every CHECK_EVERY_S), which carry rank 0's stop request and the non-finite flags.
    Asked from step 7, the loop stops at the next check (10) with a checkpoint of it. A masked LM's counts vary:
    one all-reduce a step besides. With CHECK_EVERY_S 0 every step is a check."""
    extra = ["pretrain.objective=mlm", "model.arch.family=bert"] if objective == "mlm" else []
    cfg = tiny_config(tmp_path, encoder_shards if objective == "mlm" else shards_dir,
                      minilm_dir if objective == "mlm" else tokenizer_dir, "pretrain.train.max_steps=20",
                      "pretrain.deepspeed.precision=fp32", *extra)
    out = tmp_path / "r.json"
    spawn(workers.loop_checks, (2, free_port(), cfg, str(out), check_every_s), 2)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "every rank runs the same collectives and stops at the same step"
    res = ranks[0]
    stop_at = 10 if check_every_s else 7
    assert res["preempted"] and res["step"] == stop_at and res["saved"] == [stop_at]
    checks = {1, 5, 10} if check_every_s else set(range(1, 8))
    logs = {5, stop_at}  # a log (or save) step's row: its own all-reduce of the interval's sums
    expected, last_check, last_log = [], 0, 0  # the size of each all-reduce, in order
    for step in range(1, stop_at + 1):
        expected += [1] if objective == "mlm" else []  # the step's global target count
        if step in checks:  # stop request, steps to the next check, a non-finite flag per step since the last
            expected, last_check = expected + [2 + step - last_check], step
        if step in logs:  # loss, targets, tokens, replaced, work, and each step's loss
            expected, last_log = expected + [5 + step - last_log], step
    assert res["calls"] == expected
