"""`deepspeed.precision: auto`: bf16 where it is fast (GPUs, CPUs with native bf16 kernels), fp32 on other CPUs,
where emulated bf16 matmuls ran 8x slower on the quickstart; a resumed stage keeps its checkpoint's precision."""

import json
from pathlib import Path

import pytest
import torch

from dist_train.cli import main
from dist_train.config import hardware
from dist_train.config.checks import check_run, resolve, resolve_precision
from dist_train.config.derived import derive_stage, stage_precision
from dist_train.config.loader import load_config, to_dict
from dist_train.train.metrics import device_peak_flops

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: request.param)
    monkeypatch.setattr("dist_train.config.checks.cpu_has_bf16", lambda: request.param)
    return request.param


def test_auto_is_bf16_on_gpus_and_on_cpus_with_native_bf16_else_fp32(native):
    assert hardware.auto_precision(use_gpu=True)[0] == "bf16"
    value, why = hardware.auto_precision(use_gpu=False)
    assert value == ("bf16" if native else "fp32") and why.startswith("auto: this CPU has")
    ds = derive_stage(load_config(QUICKSTART), "pretrain").deepspeed  # derived without the driver's resolve, too
    assert ds["bf16"]["enabled"] is native and ds["fp16"]["enabled"] is False


def test_an_explicit_precision_stays_and_auto_follows_the_users_deepspeed_json(native):
    cfg = load_config(QUICKSTART, ["pretrain.deepspeed.precision=fp32",
                                   "finetune.deepspeed.extra={bf16: {enabled: true}}"])
    assert stage_precision(cfg.pretrain.deepspeed, use_gpu=True) == ("fp32", "deepspeed.precision")
    assert stage_precision(cfg.finetune.deepspeed, use_gpu=False) == ("bf16", "auto: your DeepSpeed JSON enables bf16")
    off = load_config(QUICKSTART, ["pretrain.deepspeed.extra={bf16: {enabled: false}}"])
    assert stage_precision(off.pretrain.deepspeed, use_gpu=True) == ("fp32", "auto: your DeepSpeed JSON disables bf16")
    assert derive_stage(off, "pretrain").deepspeed["bf16"]["enabled"] is False  # no conflict with the JSON


def test_the_run_gets_a_concrete_precision_and_says_why(native, tmp_path):
    notes: list[str] = []
    cfg = resolve(load_config(QUICKSTART, [f"output_dir={tmp_path}"]), notes)
    want = "bf16" if native else "fp32"
    assert cfg.pretrain.deepspeed.precision == cfg.finetune.deepspeed.precision == want
    assert notes[0].startswith(f"[pretrain] precision: {want} (auto: this CPU has ")
    assert notes[1].startswith(f"[finetune] precision: {want}")
    # stored in the run (meta.json, the model card): the concrete value, never "auto"
    assert to_dict(cfg)["pretrain"]["deepspeed"]["precision"] == want


def test_a_resumed_stage_keeps_its_checkpoints_precision(native, tmp_path):
    """A DeepSpeed checkpoint does not load into another precision: auto pins to it, whatever the machine."""
    made = "fp32" if native else "bf16"  # the other machine kind made it
    old = to_dict(resolve_precision(load_config(QUICKSTART, [f"output_dir={tmp_path}",
                                                             f"pretrain.deepspeed.precision={made}"])))
    tag = tmp_path / "pretrain" / "checkpoints" / "step_00000060"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"config": old, "step": 60}))
    (tag.parent / "latest").write_text("step_00000060\n")
    notes: list[str] = []
    cfg = resolve(load_config(QUICKSTART, [f"output_dir={tmp_path}"]), notes)
    assert cfg.pretrain.deepspeed.precision == made
    assert f"[pretrain] precision: {made} (auto: as the checkpoint it resumes from (step_00000060))" in notes
    # the workers resume from the newest committed checkpoint that verifies, `latest` or not
    newer = tag.parent / "step_00000080"
    newer.mkdir()
    (newer / "meta.json").write_text("{damaged")
    (tag.parent / "latest").unlink()
    assert resolve_precision(load_config(QUICKSTART, [f"output_dir={tmp_path}"])).pretrain.deepspeed.precision == made


def test_explicit_bf16_on_a_cpu_without_it_is_run_with_a_note(monkeypatch, tmp_path, shards_dir, tokenizer_dir):
    monkeypatch.setattr("dist_train.config.checks.cpu_has_bf16", lambda: False)
    cfg = resolve(load_config(None, [
        f"output_dir={tmp_path}", f"model.tokenizer={tokenizer_dir}", "pretrain.deepspeed.precision=bf16",
        "model.arch={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
        f"pretrain.data.shards={shards_dir}", "pretrain.data.seq_len=32", "pretrain.train.max_steps=2",
        "pretrain.train.global_batch_size=4", "pretrain.train.micro_batch_size=2"]))
    notes = check_run(cfg, ["pretrain"])
    assert any(n.startswith("note: pretrain runs in bf16 on a CPU without native bf16") and
               n.endswith("a new run with precision=auto takes fp32 here") for n in notes), notes


def test_validate_says_what_auto_chose(native, tmp_path, capsys):
    assert main(["validate", str(QUICKSTART), f"output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    want = "bf16" if native else "fp32"
    assert f"[pretrain] precision: {want} (auto: this CPU has " in out and f"precision={want}" in out


def test_mfu_on_a_cpu_without_native_bf16_is_against_the_fp32_peak(monkeypatch):
    """Emulated bf16 converts to fp32: its own slow matmul is no ceiling (it gave MFU over 300%)."""
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    _, source = device_peak_flops(False, torch.bfloat16, 1)
    assert source == "measured:cpu x1 threads float32 (no native bfloat16)"


def test_the_probe_reads_the_cpus_bf16_flags_not_onednns_avx512(monkeypatch):
    """oneDNN says yes on any AVX512 CPU (Skylake emulates bf16); the flags say what the silicon has."""
    for flags, want in [({"avx2", "avx512f", "avx512bw"}, False), ({"avx512f", "avx512_bf16"}, True),
                        ({"amx_tile", "amx_bf16"}, True), ({"asimd", "bf16"}, True), ({"avx2", "fma"}, False)]:
        monkeypatch.setattr(hardware, "_cpu_flags", lambda flags=flags: flags)
        assert hardware.cpu_has_bf16() is want, flags
