"""Supervised fine-tuning of a causal LM on prompt/response pairs.

The prompt is rendered with the tokenizer's chat template when it has one (a user turn plus the
generation prompt), else used as is; the response follows, ended by EOS. Only response tokens
are targets: every prompt and padding position has label -100, so the prompt contributes zero
loss. Metrics: loss and perplexity per response token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dist_train.data.manifest import DataError
from dist_train.model.lm_head import LMLoss
from dist_train.tasks import metrics as M
from dist_train.tasks.batching import Example, collate_packed, collate_tokens

IGNORE = -100


class SFT:
    name = "sft"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    metrics_names = ("loss", "perplexity")

    def __init__(self, spec: dict[str, Any], tokenizer: Any, train: list[dict[str, Any]] | None) -> None:
        self.spec, self.tok = spec, tokenizer
        self.prompt, self.response = spec["prompt_field"], spec["response_field"]
        self.loss = LMLoss(shift=True)  # an LMLoss: the engine may compute it with the chunked LM head
        if tokenizer.eos_token_id is None:
            raise DataError("sft needs a tokenizer with an EOS token (responses end with it): "
                            "use a decoder's tokenizer")

    def prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(prompt)["input_ids"]

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def featurize(self, records: list[dict[str, Any]], with_labels: bool = True) -> list[Example]:
        """Unpadded examples: prompt + response + EOS token ids and their labels (-100 on the prompt);
        without labels, the prompt alone (for generation)."""
        limit = self.spec["max_length"]
        examples = []
        for r in records:
            p = self.prompt_ids(str(r[self.prompt]))
            a = self.tok(str(r[self.response]), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] \
                if with_labels else []
            if len(p) + len(a) > limit:  # keep the response; cut the prompt's start
                p = p[max(0, len(p) + len(a) - limit):]
                a = a[:limit - len(p)]
            examples.append({"input_ids": p + a, **({"labels": [IGNORE] * len(p) + a} if with_labels else {})})
        return examples

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """A padded batch; prompts alone (no labels) are padded on the left, since generation continues
        from the end."""
        left = "labels" not in examples[0]
        return collate_tokens(examples, self.spec["max_length"], {"input_ids": self.pad_id, "labels": IGNORE}, left)

    def pack(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """The examples packed into rows of max_length tokens (see batching.collate_packed): no padding
        between them, attention and positions per example, the same summed loss as `collate`."""
        return collate_packed(examples, self.spec["max_length"], self.pad_id)

    def encode(self, records: list[dict[str, Any]], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return self.collate(self.featurize(records, with_labels))

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # the first position predicts nothing


    def stats(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray:
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().cpu().transpose(1, 2), labels,
                                               ignore_index=IGNORE, reduction="none")  # (B, T-1)
        tokens = (labels != IGNORE).sum(1).double().numpy()
        return np.array([float((ce.sum(1).double().numpy() * weight).sum()), float((tokens * weight).sum()),
                         float(weight.sum())])

    def metrics(self, stats: np.ndarray) -> dict[str, Any]:
        loss = stats[0] / stats[1] if stats[1] else float("nan")
        return {"loss": loss, "perplexity": M.perplexity(loss), "response_tokens": float(stats[1]),
                "examples": float(stats[2])}

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        raise NotImplementedError("sft predictions are generated: see dist_train.tasks.predict")

    def describe(self) -> dict[str, Any]:
        return {}
