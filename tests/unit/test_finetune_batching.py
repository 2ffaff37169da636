"""Fine-tuning batches without padding waste: length grouping as a pure plan, padding to ×8, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_train.data.tasks import epoch_batches, rank_micro_batches, step_indices
from dist_train.tasks.batching import collate_packed, collate_tokens, compact, pack_rows, pad_width
from dist_train.train.loss import lm_loss_sum


def lengths_like_real_data(n: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths, as in real labeled text (most short, a few long)."""
    return [int(x) for x in np.clip(np.random.default_rng(seed).lognormal(3.0, 0.7, n), 4, 256)]


def test_a_batch_pads_to_its_longest_rounded_up_to_8_from_64_never_past_max_length():
    assert pad_width([3, 5], 128) == 5  # short: rounding 5 up to 8 would be 37% padding
    assert pad_width([63, 2], 128) == 63
    assert pad_width([65], 128) == 72  # from 64 tokens on, at most an eighth more
    assert pad_width([64, 2], 128) == 64
    assert pad_width([126], 128) == 128
    assert pad_width([127], 127) == 127  # max_length itself need not be a multiple of 8
    batch = collate_tokens([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [5], "labels": 0}], 128,
                           {"input_ids": 0})
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].sum().item() == 4
    assert batch["labels"].tolist() == [1, 0]


def test_the_grouped_plan_is_pure_covers_each_example_once_and_cuts_padding():
    n, g = 1000, 32
    lengths = lengths_like_real_data(n)
    for epoch in (0, 1):
        plan = epoch_batches(epoch, n, g, seed=7, lengths=lengths)
        again = epoch_batches(epoch, n, g, seed=7, lengths=lengths)
        assert all((a == b).all() for a, b in zip(plan, again, strict=True))  # a function of its inputs alone
        ungrouped = epoch_batches(epoch, n, g, seed=7)
        used = np.concatenate(plan)
        # the same examples as the plain plan (the same remainder left out), each exactly once
        assert sorted(used.tolist()) == sorted(np.concatenate(ungrouped).tolist())
        assert len(set(used.tolist())) == len(used) == (n // g) * g
        longest = max(lengths[i] for i in used)
        assert max(lengths[i] for i in plan[0]) == longest  # the largest batch first: an OOM shows at step 1

    def padded(batches: list[np.ndarray]) -> int:  # positions computed with micro batches of 8 on 2 ranks
        total = 0
        for b in batches:
            for rank in (0, 1):
                for micro in rank_micro_batches(b, 8, 2, rank, lengths):
                    total += pad_width([lengths[i] for i in micro], 256) * len(micro)
        return total

    def padded_plain(batches: list[np.ndarray]) -> int:
        return sum(pad_width([lengths[i] for i in m], 256) * len(m)
                   for b in batches for rank in (0, 1) for m in rank_micro_batches(b, 8, 2, rank))

    real = sum(lengths[i] for b in epoch_batches(0, n, g, 7, lengths) for i in b)
    grouped, plain = padded(epoch_batches(0, n, g, 7, lengths)), padded_plain(epoch_batches(0, n, g, 7))
    # what is left is mostly the rounding up to ×8 of ~20-token examples; the plain plan computes 2.5× the tokens
    assert grouped < 1.3 * real and grouped < 0.55 * plain, (real, grouped, plain)


def test_the_grouped_plan_differs_between_epochs_and_seeds():
    lengths = lengths_like_real_data(640)
    a, b, c = (epoch_batches(e, 640, 32, s, lengths) for e, s in ((0, 1), (1, 1), (0, 2)))
    assert [x.tolist() for x in a] != [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


@pytest.mark.parametrize("grouped", [True, False])
def test_every_worker_count_trains_the_same_global_batch(grouped):
    lengths = lengths_like_real_data(256) if grouped else None
    batch = epoch_batches(0, 256, 32, 3, lengths)[5]
    for world in (1, 2, 4):
        ranks = [rank_micro_batches(batch, 4, world, r, lengths) for r in range(world)]
        assert sorted(i for r in ranks for m in r for i in m) == sorted(batch.tolist())
        assert len({len(r) for r in ranks}) == 1  # the same number of micro batches everywhere (accumulation)


def test_without_grouping_the_plan_is_the_earlier_one():
    """A run started before length grouping resumes on the same examples with group_by_length: false."""
    n, g = 200, 16
    for step in (0, 3, 12, 13):
        epoch, k = divmod(step, n // g)
        batch = epoch_batches(epoch, n, g, 5)[k]
        for rank in (0, 1):
            mine = [i for m in rank_micro_batches(batch, 4, 2, rank) for i in m]
            assert mine == step_indices(step, n, g, 5, 2, rank)


def test_packing_fills_rows_and_places_every_example_once():
    lengths = lengths_like_real_data(300, seed=3)
    rows = pack_rows([min(x, 128) for x in lengths], 128)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(min(lengths[i], 128) for i in r) <= 128 for r in rows)
    fill = sum(min(x, 128) for x in lengths) / (128 * len(rows))
    assert fill > 0.9


def test_compact_examples_batch_exactly_like_lists():
    """A split held as int32 arrays (4 bytes a token) pads and packs to the same tensors as lists; a
    per-example value (a class id, multi-label floats) stays as it was."""
    rng = np.random.default_rng(2)
    lists = []
    for n in (5, 17, 9, 30):
        ids = rng.integers(1, 97, n).tolist()
        lists.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "flags": [0.0, 1.0]})
    arrays = compact([{k: list(v) for k, v in e.items()} for e in lists])
    assert arrays[0]["input_ids"].dtype == np.int32 and isinstance(arrays[0]["flags"], list)
    for left in (False, True):
        a = collate_tokens([{k: e[k] for k in ("input_ids", "labels")} for e in lists], 64,
                           {"input_ids": 0, "labels": -100}, left)
        b = collate_tokens([{k: e[k] for k in ("input_ids", "labels")} for e in arrays], 64,
                           {"input_ids": 0, "labels": -100}, left)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and b[k].dtype == torch.long for k in a)
    a, b = collate_packed(lists, 40, 0), collate_packed(arrays, 40, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def tiny_lm(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_train.model.build import _finish

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn)
    return _finish(LlamaForCausalLM(cfg).eval(), gradient_checkpointing=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_loss_and_gradients_of_padded_ones(attn):
    """Positions restart per example and attention stays inside it: the summed loss (and so the
    gradient) equals the padded batch's, example by example."""
    rng = np.random.default_rng(1)
    examples = []
    for n in (5, 17, 9, 30, 3, 12):
        ids = rng.integers(1, 97, n).tolist()
        prompt = int(rng.integers(0, n))  # 0: the first token is a target (a row start predicts nothing)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    model = tiny_lm(attn)
    padded = collate_tokens(examples, 64, {"input_ids": 0, "labels": -100})
    packed = collate_packed(examples, 40, pad_id=0)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    assert "attention_mask" not in packed

    def loss_and_grad(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        labels = batch.pop("labels")
        loss = lm_loss_sum(model(**batch).logits, labels, shift=True)
        loss.backward()
        return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    a, ga = loss_and_grad(dict(padded))
    b, gb = loss_and_grad(dict(packed))
    assert torch.allclose(a, b, rtol=1e-5), (a, b)
    assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4)
    # and the target count is the same: no example's first token is predicted from its neighbour
    assert int((padded["labels"][:, 1:] != -100).sum()) == int((packed["labels"][:, 1:] != -100).sum())
