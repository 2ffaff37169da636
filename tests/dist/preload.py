"""Imported once by the fork server of tests/dist/spawn.py: what every rank of a 2-process test needs."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import transformers  # noqa: E402, F401
from transformers.models.bert import modeling_bert  # noqa: E402, F401
from transformers.models.llama import modeling_llama  # noqa: E402, F401

from dist_train.deepspeed_import import import_deepspeed  # noqa: E402

import_deepspeed()
import dist_train.train.engine  # noqa: E402, F401
import dist_train.train.finetune  # noqa: E402, F401
import dist_train.train.loop  # noqa: E402, F401
import dist_train.train.pretrain  # noqa: E402, F401
import tests.dist.workers  # noqa: E402, F401

torch.set_num_threads(1)
