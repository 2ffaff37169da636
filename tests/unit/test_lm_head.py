"""The chunked LM loss: the same loss and gradients as full logits, never the whole vocabulary at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dist_train.model import lm_head
from dist_train.model.lm_head import ChunkedLMHead, LMLoss, chunked_head


def tiny(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "clm":
        cfg = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        model = transformers.BertForMaskedLM(cfg)
    return model.to(dtype).train(False)


def batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 301, (3, 24), generator=g)
    labels = ids.clone()
    if kind == "mlm":  # a masked LM predicts only its masked positions
        labels[torch.rand(ids.shape, generator=g) > 0.3] = -100
    labels[1, :5] = -100  # a prompt, say
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model: torch.nn.Module, b: dict[str, torch.Tensor], loss: LMLoss,
                   head: ChunkedLMHead | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    if head is None:
        value = loss(model(**inputs).logits, b["labels"])
    else:
        with head.loss_of(loss.targets(b["labels"])):
            value = model(**inputs).logits
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["clm", "mlm"])
def test_the_chunked_loss_and_gradients_equal_full_logits(kind, monkeypatch):
    monkeypatch.setattr(lm_head, "LOSS_CHUNK_ELEMENTS", 301 * 7)  # 7 rows per chunk: many chunks, a ragged last
    model = tiny(kind)
    loss = LMLoss(shift=kind == "clm")
    full, g_full = loss_and_grads(model, batch(kind), loss, None)
    head = chunked_head(model)
    assert isinstance(head, ChunkedLMHead)
    chunked, g_chunked = loss_and_grads(model, batch(kind), loss, head)
    assert torch.allclose(full, chunked, rtol=1e-5), (full, chunked)
    assert g_full.keys() == g_chunked.keys()  # the tied embedding / the MLM decoder bias get theirs too
    for name, g in g_full.items():
        assert torch.allclose(g, g_chunked[name], atol=1e-6, rtol=1e-4), name


def test_in_bf16_the_chunked_loss_matches_within_bf16_tolerance():
    model = tiny("clm", torch.bfloat16)
    loss = LMLoss(shift=True)
    full, g_full = loss_and_grads(model, batch("clm"), loss, None)
    chunked, g_chunked = loss_and_grads(model, batch("clm"), loss, chunked_head(model))
    assert abs(float(full) - float(chunked)) <= 1e-2 * abs(float(full))
    for name, g in g_full.items():
        scale = float(g.float().abs().max()) + 1e-12
        assert float((g.float() - g_chunked[name].float()).abs().max()) <= 0.05 * scale, name


def test_outside_a_loss_the_head_is_a_plain_linear_and_without_grad_it_computes_none():
    model = tiny("clm")
    b = batch("clm")
    inputs = {k: v for k, v in b.items() if k != "labels"}
    before = model(**inputs).logits
    head = chunked_head(model)
    assert torch.equal(model(**inputs).logits, before)  # evaluation, generation
    with torch.no_grad(), head.loss_of(LMLoss(shift=True).targets(b["labels"])):
        value = model(**inputs).logits
    assert value.dim() == 0 and torch.allclose(value, LMLoss(shift=True)(before, b["labels"]), rtol=1e-5)


def test_heads_it_cannot_replace_are_left_alone():
    import transformers

    cls = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert chunked_head(cls) is None  # a task head: no LM head
    capped = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0))
    assert chunked_head(capped) is None  # its logits are transformed after the head
    assert type(capped.get_output_embeddings()) is torch.nn.Linear


def test_a_logit_transform_named_by_a_config_or_not_never_reaches_the_loss(capsys):
    """A multiplier named in the config (Falcon-H1's lm_head_multiplier) keeps HF's head; one that no key
    names (here a subclass that doubles the logits) is caught at the first loss, which is then computed
    from full logits, correctly, with one console line."""
    import transformers

    from dist_train.train.engine import Engine

    cfg = tiny("clm").config
    named = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg.to_dict(), "lm_head_multiplier": 0.5}))
    assert chunked_head(named) is None

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    model = Doubled(cfg).train(False)
    engine = Engine(model, chunked_head(model))  # the HF model is callable like DeepSpeed's engine
    assert engine.head is not None
    b = batch("clm")
    loss = engine.loss(dict(b), LMLoss(shift=True))
    with torch.no_grad():
        expected = LMLoss(shift=True)(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"])
    assert engine.head is None and torch.allclose(loss, expected, rtol=1e-5)
    assert "transforms its logits after the LM head" in capsys.readouterr().out


def test_in_fp16_under_a_loss_scale_the_input_gradient_matches_fp32():
    """fp16 with a loss scale, as DeepSpeed's fp16 mode runs it: the hidden states' gradient matches an
    fp32 reference (the chunked loss keeps it in fp32 until backward has applied the scale)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 5000, bias=False).half()
    hidden = (torch.randn(8, 16) * 0.01).half().requires_grad_()
    targets = torch.randint(0, 5000, (8,))
    head.__class__ = ChunkedLMHead
    with head.loss_of(targets[None]):
        loss = head(hidden[None])
    (loss * 65536.0).backward()  # what fp16 loss scaling does
    ref = hidden.detach().float().requires_grad_()
    (torch.nn.functional.cross_entropy(ref @ head.weight.float().t(), targets, reduction="sum") * 65536.0).backward()
    torch.testing.assert_close(hidden.grad.float(), ref.grad, rtol=2e-2, atol=1e-2)


PEAK = """
import json, sys, torch
from dist_train.model.lm_head import ChunkedLMHead, LMLoss
torch.manual_seed(0)
V, H, T = 32000, 64, 2048
head = torch.nn.Linear(H, V, bias=False)
hidden = torch.randn(1, T, H, requires_grad=True)
labels = torch.randint(0, V, (1, T))
loss = LMLoss(shift=True)
def status(key):  # kB, from the kernel's view of this process
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now: imports and setup do not count
base = status("VmRSS")
if sys.argv[1] == "chunked":
    head.__class__ = ChunkedLMHead  # what chunked_head does to a model's output Linear
    with head.loss_of(loss.targets(labels)):
        value = head(hidden)
else:
    value = loss(head(hidden), labels)
value.backward()
print(json.dumps({"grew_mb": (status("VmHWM") - base) / 1024,
                  "loss": float(value)}))
"""


def test_peak_memory_holds_one_chunk_of_logits_not_the_vocabulary():
    """A 32k vocabulary at 2048 tokens: full fp32 logits are 250 MiB (and their log-softmax and gradient
    as much again); the chunked loss holds 64 MiB chunks. Measured as each process's peak RSS over its RSS once
    set up (the kernel's peak is reset there, so imports do not hide what the loss takes)."""
    runs = {}
    for mode in ("full", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout)
    assert abs(runs["full"]["loss"] - runs["chunked"]["loss"]) < 1e-3 * runs["full"]["loss"]
    assert runs["full"]["grew_mb"] > 500, runs
    assert runs["chunked"]["grew_mb"] < 0.4 * runs["full"]["grew_mb"], runs
