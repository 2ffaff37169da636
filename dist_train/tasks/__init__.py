"""Fine-tuning tasks: what differs between classification, regression, token tagging and SFT.

A `Task` turns records into unpadded examples once (`featurize`) and examples into padded model
batches at each step (`collate`; `encode` does both), computes the loss as a sum over its targets (so the
loop's token weighting applies), turns predictions into summable statistics (ranks all-reduce
them) and those into metrics, and formats predictions for `dist-train predict`. No distributed
code here: the finetune stage and the predict command drive tasks.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

TASK_FILE = "dist_train_task.json"  # written into every export: how to read inputs and outputs


class Task(Protocol):
    name: str
    auto_class: str  # the transformers Auto class of the model
    peft_task_type: str  # peft's TaskType name (decides which head modules LoRA trains fully)
    metrics_names: tuple[str, ...]  # scalar metrics of metrics(); the first is the main one (best_metric: auto)

    def model_kwargs(self) -> dict[str, Any]: ...
    def featurize(self, records: list[dict[str, Any]], with_labels: bool = True) -> list[dict[str, Any]]: ...
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...
    def encode(self, records: list[dict[str, Any]], with_labels: bool = True) -> dict[str, torch.Tensor]: ...
    def targets(self, batch: dict[str, torch.Tensor]) -> int: ...
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def stats(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray: ...
    def metrics(self, stats: np.ndarray) -> dict[str, Any]: ...
    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]: ...
    def describe(self) -> dict[str, Any]: ...


def task_class(name: str) -> type:
    from dist_train.tasks.heads import Classification, MultiLabel, Regression
    from dist_train.tasks.sft import SFT
    from dist_train.tasks.tokens import TokenClassification

    return {"sequence_classification": Classification, "multi_label_classification": MultiLabel,
            "regression": Regression, "token_classification": TokenClassification, "sft": SFT}[name]


def build_task(name: str, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> Task:
    """The task `name` for these data fields (`spec`, see FinetuneData) and tokenizer. Label sets are
    read from `train`; when `train` is None they come from `spec` (a described export)."""
    return task_class(name)(spec, tokenizer, train)


def task_fields(name: str, spec: dict[str, Any]) -> list[str]:
    """The record fields task `name` reads (with labels)."""
    if name == "token_classification":
        return [spec["tokens_field"], spec["tags_field"]]
    if name == "sft":
        return [spec["prompt_field"], spec["response_field"]]
    pair = [spec["text_pair_field"]] if spec.get("text_pair_field") else []
    return [spec["text_field"], *pair, spec["label_field"]]
