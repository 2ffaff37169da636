"""What most users run today: Hugging Face `Trainer` with DeepSpeed, under `torchrun`.

    torchrun --nproc-per-node 2 bench/peers/hf_trainer.py SPEC.json

The same rows, model, global batch, ZeRO stage and bf16; the DeepSpeed config is the spec's (by
default the ZeRO-2 example of the transformers DeepSpeed guide, "auto" values filled by Trainer).
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from bench.peers.common import StepTimer, load_spec, token_rows


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows) -> None:
        self.rows = torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Timing(TrainerCallback):
    def __init__(self, timer: StepTimer, tokens_per_step: int) -> None:
        self.timer, self.tokens = timer, tokens_per_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.timer.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.timer.stop(self.tokens)


def main() -> None:
    spec = load_spec(sys.argv)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model_config"]))
    rows = token_rows(spec["shards"])
    timer = StepTimer(spec["warmup"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["micro"], gradient_accumulation_steps=1,
            max_steps=spec["steps"], learning_rate=spec["lr"], warmup_steps=2, lr_scheduler_type="cosine",
            bf16=True, deepspeed=spec["ds_config"], logging_steps=spec["steps"], save_strategy="no",
            report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=Rows(rows),
                          callbacks=[Timing(timer, rows.shape[1] * spec["micro"])])
        trainer.train()
    timer.write(spec, params=sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
