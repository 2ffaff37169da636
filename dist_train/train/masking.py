"""Dynamic masking for masked-LM pretraining (BERT recipe). Pure numpy; no distribution here.

Each sample is masked by its own generator, seeded by (seed, step, position in the global
batch), so the masks are the same after a resume on any worker count. Of the chosen positions
80% become [MASK], 10% a random token and 10% stay; only they carry labels (-100 elsewhere).
Special tokens are never chosen. With whole-word masking, a word's sub-tokens are chosen together.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def word_starts_table(tokenizer) -> np.ndarray:
    """For every token id: True when it begins a word (WordPiece '##' marks continuations,
    byte-level BPE 'Ġ' and SentencePiece '▁' mark word starts)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if any(t.startswith("##") for t in vocab if t):
        return np.array([not (t or "").startswith("##") for t in vocab])
    marker = "Ġ" if any((t or "").startswith("Ġ") for t in vocab) else "▁"
    return np.array([(t or "").startswith(marker) for t in vocab])


def mask_batch(rows: np.ndarray, seeds: list[tuple[int, ...]], *, mask_id: int, vocab_size: int,
               special_ids: np.ndarray, probability: float,
               word_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) for a (B, T) batch of token ids; seeds[i] seeds row i's mask."""
    ids = rows.astype(np.int64)
    labels = np.full_like(ids, IGNORE)
    maskable = ~np.isin(ids, special_ids)  # (B, T)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        if word_starts is None:
            chosen = (rng.random(ids.shape[1]) < probability) & maskable[i]
        else:  # choose words, then every sub-token of a chosen word
            word = np.cumsum(word_starts[ids[i]] | ~maskable[i])  # (T,) word index of each token
            chosen = (rng.random(int(word[-1]) + 1) < probability)[word] & maskable[i]
        labels[i, chosen] = ids[i, chosen]
        action = rng.random(ids.shape[1])
        replace = chosen & (action < 0.8)
        randomize = chosen & (action >= 0.8) & (action < 0.9)
        ids[i, replace] = mask_id
        ids[i, randomize] = rng.integers(0, vocab_size, int(randomize.sum()))
    return ids, labels
