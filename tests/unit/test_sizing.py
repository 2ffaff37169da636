"""`dist-train validate --plan`: its figures against the ZeRO paper's arithmetic and Korthikanti
et al.'s activation count, on the Llama-3-8B recipe (architecture only, built on the meta device)."""

from __future__ import annotations

import pytest

from dist_train.config.loader import ConfigError, load_config
from dist_train.config.memory import ArchShape, activation_bytes, layer_activation_bytes_per_token
from dist_train.config.sizing import GiB, Hardware, parse_memory, plan_stage
from tests.conftest import REPO, run_cli

RECIPE = REPO / "configs" / "llama3_8b_domain.yaml"
ARCH = f"model.name_or_path={REPO / 'configs' / 'llama3_8b'}"
PSI = 8_030_261_248  # Meta-Llama-3-8B's published parameter count


def recipe(*overrides: str):
    return load_config(RECIPE, [ARCH, *overrides])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_per_rank_follow_the_zero_paper(stage):
    """ZeRO paper §3 / Figure 1: (2 + 2 + K)Ψ bytes per rank at stage 0; Pos: 2Ψ + 2Ψ + KΨ/N;
    Pos+g: 2Ψ + (2 + K)Ψ/N; Pos+g+p: (2 + 2 + K)Ψ/N, with K = 12 for mixed-precision Adam."""
    n, k = 32, 12
    plan = plan_stage(recipe(f"pretrain.deepspeed.zero_stage={stage}"), "pretrain", Hardware(4, 8, 80 * GiB))
    assert plan.shape.params == PSI and plan.world == n
    expected = {0: 2 * PSI + 2 * PSI + k * PSI, 1: 2 * PSI + 2 * PSI + k * PSI / n,
                2: 2 * PSI + (2 + k) * PSI / n, 3: (2 + 2 + k) * PSI / n}[stage]
    assert plan.states.total == pytest.approx(expected, rel=1e-12)
    assert plan.checkpoint == pytest.approx(14 * PSI)  # bf16 weights + fp32 master + two Adam moments


def test_lora_trains_only_the_adapters():
    plan = plan_stage(recipe("finetune.deepspeed.zero_stage=3"), "finetune", Hardware(4, 8, 80 * GiB))
    # r · (in + out) for q, k, v, o, gate, up, down in each of the 32 layers (GQA: k, v are 1024 wide).
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert plan.trainable == 32 * per_layer
    assert plan.states.weights == pytest.approx(2 * PSI / 32)  # frozen weights: 16 bits, partitioned at ZeRO-3
    assert plan.states.optimizer == pytest.approx(12 * 32 * per_layer / 32)
    # the recipe's ZeRO-2: the frozen weights whole on every GPU (16 GB of 80), no per-layer gathers
    whole = plan_stage(recipe(), "finetune", Hardware(4, 8, 80 * GiB))
    assert whole.states.weights == pytest.approx(2 * PSI) and whole.device_total(False) < 0.75 * 80 * GiB


def test_activations_follow_korthikanti_for_a_gpt_block():
    """Eq. 1 of "Reducing Activation Recomputation in Large Transformer Models": per layer
    s·b·h·(34 + 5·a·s/h) bytes, i.e. 34h + 5as per token, for a 4h MLP without flash attention."""
    h, a, s = 2048, 16, 2048
    gpt = ArchShape("bert", params=0, hidden=h, layers=24, heads=a, kv_heads=a, intermediate=4 * h, vocab=50257,
                    layer_params=12 * h * h, largest_param=50257 * h)
    assert layer_activation_bytes_per_token(gpt, s, flash_attention=False) == 34 * h + 5 * a * s
    # Full recomputation keeps each block's input (2·s·b·h bytes at 16 bits) plus one block.
    ckpt = activation_bytes(gpt, s, 1, checkpointing=True, lm_head=False, flash_attention=False)
    assert ckpt.blocks == 24 * 2 * s * h + (34 * h + 5 * a * s) * s


def test_recipe_fits_80gb_without_checkpointing_and_a_small_gpu_gets_a_warning():
    res = run_cli("validate", str(RECIPE), ARCH, "--plan", "--stage", "pretrain", "--nodes", "4",
                  "--gpus-per-node", "8", "--gpu-memory", "80GB")
    assert res.returncode == 0, res.stderr
    assert "total, checkpointing on                12.27" in res.stdout and "fits (15% of the GPU)" in res.stdout
    assert "activations, checkpointing off         45.64      0.00  <- auto picks this" in res.stdout
    assert "fits (66% of the GPU)" in res.stdout  # within auto's 75%: checkpointing stays off
    assert "warning" not in res.stdout
    res = run_cli("validate", str(RECIPE), ARCH, "--plan", "--stage", "pretrain", "--nodes", "4",
                  "--gpus-per-node", "8", "--gpu-memory", "24GB", "pretrain.train.gradient_checkpointing=false")
    assert res.returncode == 0, res.stderr
    assert "DOES NOT FIT" in res.stdout
    assert "warning: will not fit: 52.4 GiB per GPU needed, 21.6 GiB usable (90% of 24); try " \
           "pretrain.train.gradient_checkpointing=true" in res.stdout


def test_the_chunked_loss_keeps_the_128k_vocabulary_logits_out_of_the_plan():
    """Full logits at 128256 × 2 × 4096 tokens: (2 + 4 + 4) bytes each, 9.79 GiB; chunked: a 64 MiB chunk and its
    softmax, the hidden states' gradient (2 bytes × h per token) and the head's fp32 gradient (4·V·h)."""
    on, off = (plan_stage(recipe(f"pretrain.train.chunked_loss={v}"), "pretrain", Hardware(4, 8, 80 * GiB))
               for v in ("true", "false"))
    assert off.act_on.lm_head == pytest.approx(10 * 128256 * 2 * 4096)
    assert on.act_on.lm_head == pytest.approx(8 * 2**24 + 2 * 4096 * 2 * 4096 + 4 * 128256 * 4096)
    assert off.act_on.lm_head / GiB == pytest.approx(9.79, abs=0.01) and on.act_on.lm_head / GiB < 2.2
    assert on.full_logits == off.act_on.lm_head


def test_auto_checkpointing_is_off_where_the_plan_has_room_and_on_where_it_does_not():
    from dist_train.config.sizing import auto_checkpointing

    assert plan_stage(recipe(), "pretrain", Hardware(4, 8, 80 * GiB)).checkpointing is False
    assert plan_stage(recipe(), "pretrain", Hardware(4, 8, 40 * GiB)).checkpointing is True
    assert plan_stage(recipe(), "pretrain", Hardware(4, 8)).checkpointing is None  # decided on the workers
    assert plan_stage(recipe("pretrain.train.gradient_checkpointing=true"), "pretrain",
                      Hardware(4, 8, 80 * GiB)).checkpointing is True
    on, need = auto_checkpointing(recipe("ray.num_workers=32"), "pretrain", 80 * GiB)
    assert not on and need / GiB == pytest.approx(52.41, abs=0.01)
    assert auto_checkpointing(recipe("ray.num_workers=32"), "pretrain", 40 * GiB)[0]


def test_a_plan_names_what_does_not_divide():
    plan = plan_stage(recipe("pretrain.train.global_batch_size=192", "pretrain.data.lanes=48"), "pretrain",
                      Hardware(3, 8))
    assert plan.world == 24 and plan.grad_accum == 4
    assert plan.warnings == ["the config has ray.num_workers=32: pass ray.num_workers=24 (and ray.use_gpu=true) "
                             "to use all 24 GPUs"]
    with pytest.raises(ConfigError, match="global_batch_size=256 is not divisible"):
        plan_stage(recipe(), "pretrain", Hardware(3, 8))
    with pytest.raises(ConfigError, match="lanes=64 is not divisible by the 24 workers"):
        plan_stage(recipe("pretrain.train.global_batch_size=192"), "pretrain", Hardware(3, 8))


@pytest.mark.parametrize(("text", "gib"), [("80GB", 80), ("141GiB", 141), ("80g", 80), ("2TB", 2048), ("96", 96)])
def test_gpu_memory_sizes(text, gib):
    assert parse_memory(text) == gib * GiB


def test_a_bad_gpu_memory_is_one_line():
    res = run_cli("validate", str(RECIPE), ARCH, "--plan", "--gpus-per-node", "8", "--gpu-memory", "lots")
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: --gpu-memory 'lots' is not a size: write e.g. 80GB or 141GiB"


def test_sizing_options_without_plan_are_refused():
    res = run_cli("validate", str(RECIPE), ARCH, "--gpu-memory", "80GB")
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: --nodes, --gpus-per-node and --gpu-memory size a plan: add --plan"
