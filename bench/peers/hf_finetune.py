"""Fine-tuning as most users run it: Hugging Face `Trainer` + DeepSpeed under `torchrun`, on the
same examples, model, batch and optimizer settings as the dist_train run it is compared with.

    torchrun --nproc-per-node 2 bench/peers/hf_finetune.py SPEC.json

The examples are tokenized by dist_train's own task (the same token ids, the same truncation), then
fed the way users feed Trainer: `DataCollatorWithPadding` for a classification task, and
`DataCollatorForSeq2Seq` (labels padded with -100) for SFT, with a random sampler or, with
spec["grouped"], Trainer's `train_sampling_strategy="group_by_length"`. Reported: real (non-pad)
tokens per second over the steps after spec["warmup"], counted at the loss, summed over ranks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from bench.peers.common import load_spec
from dist_train.config.loader import load_config
from dist_train.model.build import arch_config, load_tokenizer
from dist_train.tasks import build_task
from dist_train.tasks.records import read_splits, task_spec


class CountingTrainer(Trainer):
    """Trainer that counts the real tokens each training micro batch carries (its attention mask)."""

    real_tokens = 0

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.real_tokens += int(inputs["attention_mask"].sum())
        return super().compute_loss(model, inputs, *args, **kwargs)


class Timing(TrainerCallback):
    """Wall time between consecutive optimizer steps' ends (so batch fetching and collation count, as
    they do in dist_train's figure), and the real tokens trained in them, after `warmup` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.trainer = warmup, None
        self.seconds, self.tokens, self._last, self._tokens_at = 0.0, 0, 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now, seen = time.perf_counter(), self.trainer.real_tokens
        if state.global_step > self.warmup:
            self.seconds += now - self._last
            self.tokens += seen - self._tokens_at
        self._last, self._tokens_at = now, seen


def main() -> None:
    spec = load_spec(sys.argv)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = load_config(spec["config"])
    tok = load_tokenizer(cfg.model.tokenizer)
    train, _, _ = read_splits(cfg)
    task = build_task(cfg.finetune.task, task_spec(cfg), tok, train)
    examples = task.featurize(train)
    config = arch_config(cfg.model.arch, len(tok), tok.pad_token_id, tok.eos_token_id)
    for key, value in task.model_kwargs().items():
        setattr(config, key, value)
    model = getattr(transformers, task.auto_class).from_config(config)
    collator = (DataCollatorForSeq2Seq(tok, label_pad_token_id=-100) if cfg.finetune.task == "sft"
                else DataCollatorWithPadding(tok))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    timing = Timing(spec["warmup"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["micro"],
            gradient_accumulation_steps=spec["global_batch"] // (spec["micro"] * world),
            max_steps=spec["steps"], learning_rate=spec["lr"], warmup_steps=spec["warmup_steps"],
            lr_scheduler_type="cosine", weight_decay=0.01, bf16=True, deepspeed=spec["ds_config"],
            logging_steps=spec["steps"], save_strategy="no", report_to=[], dataloader_num_workers=0,
            disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(),
            train_sampling_strategy="group_by_length" if spec["grouped"] else "random")
        trainer = CountingTrainer(model=model, args=args, train_dataset=examples, data_collator=collator,
                                  callbacks=[timing])
        timing.trainer = trainer
        trainer.train()
    totals = torch.tensor([float(timing.tokens), timing.seconds], dtype=torch.float64)
    torch.distributed.all_reduce(totals[:1])  # tokens: every rank's; seconds: each rank's own (equal by the step)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps({"tokens_per_s": float(totals[0] / totals[1]),
                                                 "measured_steps": spec["steps"] - spec["warmup"],
                                                 "tokens": float(totals[0]), "seconds": float(totals[1])}))
    # leave no process group to tear down at interpreter exit: once in 13 runs here, exiting with it alive
    # aborted ("terminate called without an active exception", SIGABRT) after training had finished
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
