"""Sequence-level tasks: single-label classification (binary or multi-class), multi-label
classification and regression, on one text or a text pair."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from dist_train.data.manifest import DataError
from dist_train.tasks import metrics as M
from dist_train.tasks.batching import Example, collate_tokens

IGNORE = -100


class _Sequence:
    """Shared by the sequence-level tasks: reading texts and tokenizing them."""

    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def __init__(self, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> None:
        self.spec, self.tok = spec, tokenizer
        self.text, self.pair, self.label = spec["text_field"], spec.get("text_pair_field"), spec["label_field"]

    def tokenize(self, records: list[dict[str, Any]]) -> list[Example]:
        """Unpadded token ids per record (and token types for a text pair, where the tokenizer has them)."""
        texts = [str(r[self.text]) for r in records]
        pairs = [str(r[self.pair]) for r in records] if self.pair else None
        enc = self.tok(texts, pairs, truncation=True, max_length=self.spec["max_length"])
        keys = ["input_ids"] + (["token_type_ids"] if self.pair and "token_type_ids" in enc else [])
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def featurize(self, records: list[dict[str, Any]], with_labels: bool = True) -> list[Example]:
        """Each record as an unpadded example, with its label (see `label_of`)."""
        examples = self.tokenize(records)
        if with_labels:
            for e, r in zip(examples, records, strict=True):
                e["labels"] = self.label_of(r)
        return examples

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """A batch padded to its longest example (see batching.pad_width)."""
        return collate_tokens(examples, self.spec["max_length"], {"input_ids": self.pad_id, "token_type_ids": 0})

    def encode(self, records: list[dict[str, Any]], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return self.collate(self.featurize(records, with_labels))

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def label_of(self, record: dict[str, Any]) -> Any:
        raise NotImplementedError

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())


def label_key(value: Any) -> str:
    """A label as the model's id2label names it. A whole number read as a float (1.0: a jsonl column where any
    row has a fraction, or a csv column with a gap) is the same class as the integer 1 in another file."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Classification(_Sequence):
    """One label per example; binary and multi-class alike. Labels are read from the training
    data (sorted) and stored in the export as id2label/label2id."""

    name = "sequence_classification"
    metrics_names = ("accuracy", "macro_f1", "loss")

    def __init__(self, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> None:
        super().__init__(spec, tokenizer, train)
        self.weights = None
        if train is None:
            self.labels, self.majority = list(spec["labels"]), spec.get("majority")
        else:
            counts = Counter(label_key(r[self.label]) for r in train)
            self.labels = sorted(counts)
            if len(self.labels) < 2:
                raise DataError(f"the training data has {len(self.labels)} class(es) in {self.label!r}: "
                                "classification needs at least 2")
            self.majority = counts.most_common(1)[0][0]  # the baseline: always predict it
            if spec.get("class_weights") == "balanced":  # n / (classes × count): average 1 over the data
                n = sum(counts.values())
                self.weights = torch.tensor([n / (len(self.labels) * counts[c]) for c in self.labels])
        self.id = {lab: i for i, lab in enumerate(self.labels)}

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {lab: i for i, lab in enumerate(self.labels)}}

    def label_of(self, record: dict[str, Any]) -> int:
        return self.label_id(record[self.label])  # a label unseen in training cannot be predicted: an error

    def label_id(self, value: Any) -> int:
        return self.id.get(label_key(value), len(self.labels))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(logits.device) if self.weights is not None else None
        return torch.nn.functional.cross_entropy(logits.float(), labels.clamp(max=logits.shape[-1] - 1), weight=w,
                                                 label_smoothing=self.spec.get("label_smoothing", 0.0),
                                                 reduction="sum")

    def stats(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray:
        n = len(self.labels)
        labels = batch["labels"]
        pred = logits.float().argmax(-1).cpu().numpy()
        gold = labels.cpu().numpy()
        m = np.zeros((n + 1, n + 1))  # an extra row for labels unseen in training
        np.add.at(m, (gold, pred), weight)
        ce = torch.nn.functional.cross_entropy(logits.float().cpu(), labels.clamp(max=n - 1), reduction="none")
        return np.concatenate([m.ravel(), [float((ce.double().numpy() * weight).sum())]])

    def metrics(self, stats: np.ndarray) -> dict[str, Any]:
        n = len(self.labels)
        m = stats[:-1].reshape(n + 1, n + 1)  # the last row: gold labels never seen in training
        out = M.classification_metrics(m[:n, :n], self.labels)
        total = m.sum()
        base = M.ratio(m[self.id[self.majority]].sum(), total) if self.majority in self.id else float("nan")
        unseen = m[n, :n].sum() > 0
        confusion = {"labels": self.labels, "gold_labels": self.labels + (["(not in training)"] if unseen else []),
                     "counts": [[round(float(v), 6) for v in row[:n]] for row in m[:n + 1 if unseen else n]]}
        return {"accuracy": M.ratio(np.trace(m), total), "macro_f1": out["macro_f1"],
                "loss": M.ratio(stats[-1], total), "majority_rate": base, "examples": float(total),
                "per_class": out["per_class"], "confusion": confusion}

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        probs = torch.softmax(logits.float(), -1).cpu()
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": {lab: round(float(v), 6) for lab, v in zip(self.labels, p, strict=True)}}
                for p in probs]

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels, "majority": self.majority}


class MultiLabel(_Sequence):
    """Any number of labels per example: the label field holds a list (or a comma-separated
    string). Independent sigmoids, a 0.5 threshold."""

    name = "multi_label_classification"
    metrics_names = ("macro_f1", "micro_f1", "exact_match", "loss")

    def __init__(self, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> None:
        super().__init__(spec, tokenizer, train)
        if train is None:
            self.labels = list(spec["labels"])
            return
        self.labels = sorted({lab for r in train for lab in self.as_list(r[self.label])})
        if not self.labels:
            raise DataError(f"the training data has no labels in {self.label!r}: fill it with lists of labels")

    @staticmethod
    def as_list(value: Any) -> list[str]:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [label_key(v) for v in value]

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {lab: i for i, lab in enumerate(self.labels)},
                "problem_type": "multi_label_classification"}

    def label_of(self, record: dict[str, Any]) -> list[float]:
        present = set(self.as_list(record[self.label]))
        return [1.0 if lab in present else 0.0 for lab in self.labels]

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # summed over examples, averaged over labels: one example counts once, as in the others
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return bce.mean(-1).sum()

    def stats(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray:
        pred = (logits.float() > 0).long().cpu().numpy()
        gold = batch["labels"].long().cpu().numpy()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float().cpu(), batch["labels"].float(), reduction="none").mean(-1).double().numpy()
        return np.concatenate([M.multilabel_counts(pred, gold, weight), [float((loss * weight).sum())]])

    def metrics(self, stats: np.ndarray) -> dict[str, Any]:
        out = M.multilabel_metrics(stats[:-1], self.labels)
        return {**out, "loss": M.ratio(stats[-1], stats[-2]), "examples": float(stats[-2])}

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        probs = torch.sigmoid(logits.float()).cpu()
        return [{"labels": [lab for lab, v in zip(self.labels, p, strict=True) if v > 0.5],
                 "probabilities": {lab: round(float(v), 6) for lab, v in zip(self.labels, p, strict=True)}}
                for p in probs]

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels}


class Regression(_Sequence):
    """One real value per example; mean squared error loss."""

    name = "regression"
    metrics_names = ("pearson", "mse", "loss")

    def __init__(self, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> None:
        super().__init__(spec, tokenizer, train)
        for r in train or []:
            try:
                float(r[self.label])
            except (TypeError, ValueError):
                raise DataError(f"regression label {r[self.label]!r} in {self.label!r} is not a number: "
                                "use numeric labels, or task sequence_classification") from None

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression"}

    def label_of(self, record: dict[str, Any]) -> float:
        return float(record[self.label])

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ((logits.float().squeeze(-1) - labels.float()) ** 2).sum()

    def stats(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray:
        return M.regression_sums(logits.float().squeeze(-1).cpu().numpy(), batch["labels"].cpu().numpy(), weight)

    def metrics(self, stats: np.ndarray) -> dict[str, Any]:
        out = M.regression_metrics(stats)
        return {**out, "loss": out["mse"], "examples": float(stats[0])}

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        return [{"value": float(v)} for v in logits.float().squeeze(-1).cpu()]

    def describe(self) -> dict[str, Any]:
        return {}
