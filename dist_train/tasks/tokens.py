"""Token classification (NER-style tagging): one tag per word, aligned to sub-tokens.

Records hold a list of words and a list of tags of the same length. The tag of a word is the label
of its first sub-token; further sub-tokens and special tokens get -100 (no loss). Predictions and
metrics are per word, entity-level F1 over BIO spans (conlleval's convention).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dist_train.data.manifest import DataError
from dist_train.tasks import metrics as M
from dist_train.tasks.batching import Example, collate_tokens
from dist_train.tasks.heads import label_key

IGNORE = -100


class TokenClassification:
    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    metrics_names = ("f1", "precision", "recall", "tag_accuracy", "loss")

    def __init__(self, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> None:
        self.spec, self.tok = spec, tokenizer
        self.words, self.tags = spec["tokens_field"], spec["tags_field"]
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("token_classification needs a fast tokenizer (word alignment): use a tokenizer.json one")
        if train is None:
            self.labels = list(spec["labels"])
        else:
            for i, r in enumerate(train):
                if not isinstance(r[self.words], list) or len(r[self.words]) != len(r[self.tags]):
                    raise DataError(f"training record {i + 1}: {self.words!r} and {self.tags!r} must be lists of "
                                    "equal length (one tag per word)")
            self.labels = sorted({label_key(t) for r in train for t in r[self.tags]})
        self.id = {lab: i for i, lab in enumerate(self.labels)}

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": dict(self.id)}

    def featurize(self, records: list[dict[str, Any]], with_labels: bool = True) -> list[Example]:
        """Unpadded examples: token ids, and per token either its tag id (first sub-token of a word;
        -100 elsewhere) or, for predict, the index of the word it starts (-1 elsewhere) and the word count."""
        words = [[str(w) for w in r[self.words]] for r in records]
        enc = self.tok(words, is_split_into_words=True, truncation=True, max_length=self.spec["max_length"])
        examples = []
        for b, r in enumerate(records):
            first, prev = [], None  # word index at first sub-tokens, -1 elsewhere
            for w in enc.word_ids(b):
                first.append(w if w is not None and w != prev else -1)
                prev = w
            e: Example = {"input_ids": enc["input_ids"][b]}
            if with_labels:  # a tag unseen in training cannot be predicted: id len(labels) marks it, counted as wrong
                e["labels"] = [IGNORE if w < 0 else self.id.get(label_key(r[self.tags][w]), len(self.labels))
                               for w in first]
            else:
                e["word_index"], e["word_count"] = first, len(words[b])
            examples.append(e)
        return examples

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        return collate_tokens(examples, self.spec["max_length"], {"input_ids": pad, "labels": IGNORE, "word_index": -1})

    def encode(self, records: list[dict[str, Any]], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return self.collate(self.featurize(records, with_labels))

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.where(labels >= logits.shape[-1], IGNORE, labels)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")

    def _tags(self, ids: torch.Tensor, keep: torch.Tensor) -> list[str]:
        names = [*self.labels, "<unseen>"]
        return [names[int(i)] for i in ids[keep]]

    def stats(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray:
        pred = logits.float().argmax(-1).cpu()
        labels = batch["labels"]
        keep = labels != IGNORE  # the first sub-token of each (untruncated) word
        p = [self._tags(pred[b], keep[b]) for b in range(len(pred))]
        g = [self._tags(labels[b], keep[b]) for b in range(len(pred))]
        clean = torch.where(labels >= logits.shape[-1], IGNORE, labels)
        ce = torch.nn.functional.cross_entropy(logits.float().cpu().transpose(1, 2), clean, ignore_index=IGNORE,
                                               reduction="none")  # (B, T)
        loss = float((ce.sum(1).double().numpy() * weight).sum())
        return np.concatenate([M.entity_counts(p, g, list(weight)), [loss]])

    def metrics(self, stats: np.ndarray) -> dict[str, Any]:
        return {**M.entity_metrics(stats[:5]), "loss": M.ratio(stats[5], stats[4]), "words": float(stats[4])}

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        pred = logits.float().argmax(-1).cpu()
        out = []
        for b in range(len(pred)):
            keep = batch["word_index"][b] >= 0
            tags = [self.labels[int(i)] for i in pred[b][keep]]
            missing = int(batch["word_count"][b]) - len(tags)  # words cut off by max_length
            out.append({"tags": tags + ["O"] * missing, **({"truncated_words": missing} if missing else {})})
        return out

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels}
