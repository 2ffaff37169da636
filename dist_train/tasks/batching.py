"""Turning tokenized examples into model batches with as little padding as the data allows.

An *example* is what a task's `featurize` makes of one record: token ids (and per-token labels
where the task has them), tokenized once per split; `compact` stores them as int32 arrays. A batch pads its
examples to the longest of them (rounded up to a multiple of 8 from 64 tokens, tensor-core friendly,
never past the task's max_length), not to a fixed width. Packing (SFT) puts several examples in one row
with position ids restarting at each, so no position is padding and, with no attention mask,
transformers confines attention to each example (a block-diagonal causal mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

PAD_MULTIPLE = 8
ALIGN_FROM = 8 * PAD_MULTIPLE  # the shortest width rounded up to a multiple
IGNORE = -100
Example = dict[str, Any]


def pad_width(lengths: list[int], limit: int) -> int:
    """The width a batch of these lengths is padded to: its longest example, rounded up to a multiple
    of 8 (tensor-core tiles) once that costs at most an eighth more (64 tokens and up; below, the
    rounding would be mostly padding for little gain), never past max(longest, limit)."""
    longest = max(lengths)
    if longest < ALIGN_FROM:
        return longest
    return min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(longest, limit))


def pad_rows(rows: Sequence[Sequence[int]], width: int, value: int, left: bool = False) -> torch.Tensor:
    """(len(rows), width) int64: each row (a list or an int array) padded with `value` on the right
    (or the left)."""
    out = np.full((len(rows), width), value, dtype=np.int64)
    for j, r in enumerate(rows):
        if len(r) and left:
            out[j, width - len(r):] = r
        elif len(r):
            out[j, :len(r)] = r
    return torch.from_numpy(out)


def compact(examples: list[Example]) -> list[Example]:
    """The examples with their per-token fields (lists of ints as long as input_ids) as int32 arrays,
    in place: a tokenized split held for a whole run takes 4 bytes a token, not a Python int's 36."""
    for e in examples:
        n = len(e["input_ids"])
        for key, value in e.items():
            if isinstance(value, list) and len(value) == n and (not value or isinstance(value[0], int)):
                e[key] = np.asarray(value, dtype=np.int32)
    return examples


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
            # extend, not +=: with an int array on the right, list += would be numpy's elementwise add
            i.extend(e["input_ids"])
            y.extend([IGNORE, *e["labels"][1:]])
            p.extend(range(len(e["input_ids"])))
        ids.append(i)
        labels.append(y)
        positions.append(p)
    w = pad_width([len(r) for r in ids], width)
    pad = [list(range(w - len(r))) for r in ids]  # a padding tail is its own (ignored) sequence
    return {"input_ids": pad_rows(ids, w, pad_id), "labels": pad_rows(labels, w, IGNORE),
            "position_ids": torch.tensor([p + q for p, q in zip(positions, pad, strict=True)])}
