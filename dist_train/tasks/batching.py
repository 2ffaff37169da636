"""Turning tokenized examples into model batches with as little padding as the data allows.

An *example* is what a task's `featurize` makes of one record: plain Python lists of token ids
(and per-token labels where the task has them), tokenized once per split. A batch pads its
examples to the longest of them rounded up to a multiple of 8 (tensor-core friendly, never past
the task's max_length), not to a fixed width. Packing (SFT) puts several examples in one row
with position ids restarting at each, so no position is padding and, with no attention mask,
transformers confines attention to each example (a block-diagonal causal mask).
"""

from __future__ import annotations

from typing import Any

import torch

PAD_MULTIPLE = 8
IGNORE = -100
Example = dict[str, Any]


def pad_width(lengths: list[int], limit: int) -> int:
    """The width a batch of these lengths is padded to: the longest rounded up to a multiple of 8,
    but never past max(longest, limit)."""
    longest = max(lengths)
    return min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(longest, limit))


def pad_rows(rows: list[list[int]], width: int, value: int, left: bool = False) -> torch.Tensor:
    return torch.tensor([([value] * (width - len(r)) if left else []) + list(r)
                         + ([] if left else [value] * (width - len(r))) for r in rows], dtype=torch.long)


def collate_tokens(examples: list[Example], limit: int, token_pads: dict[str, int], left: bool = False
                   ) -> dict[str, torch.Tensor]:
    """A padded batch: `input_ids`, `attention_mask`, every key of `token_pads` padded with its value
    (per-token lists), and every other key stacked as it is (one value per example)."""
    width = pad_width([len(e["input_ids"]) for e in examples], limit)
    lengths = [len(e["input_ids"]) for e in examples]
    batch = {"attention_mask": pad_rows([[1] * n for n in lengths], width, 0, left)}
    for key in examples[0]:
        if key in token_pads:
            batch[key] = pad_rows([e[key] for e in examples], width, token_pads[key], left)
        else:
            batch[key] = torch.tensor([e[key] for e in examples])
    return batch


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Example indices per row: first-fit of the examples, longest first, into rows of at most
    `width` tokens. Deterministic (ties keep input order); every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def collate_packed(examples: list[Example], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Causal-LM examples packed into rows of at most `width` tokens: `input_ids`, `labels` and
    `position_ids` restarting at 0 for each example (and for the padding at a row's end), and no
    attention mask, so transformers builds a mask that keeps each example to itself. The first
    label of each example is -100: with the shift, it would be predicted from the previous example."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], width)
    ids, labels, positions = [], [], []
    for row in rows:
        i, y, p = [], [], []
        for k in row:
            e = examples[k]
            i += e["input_ids"]
            y += [IGNORE, *e["labels"][1:]]
            p += list(range(len(e["input_ids"])))
        ids.append(i)
        labels.append(y)
        positions.append(p)
    w = pad_width([len(r) for r in ids], width)
    pad = [list(range(w - len(r))) for r in ids]  # a padding tail is its own (ignored) sequence
    return {"input_ids": pad_rows(ids, w, pad_id), "labels": pad_rows(labels, w, IGNORE),
            "position_ids": torch.tensor([p + q for p, q in zip(positions, pad, strict=True)])}
