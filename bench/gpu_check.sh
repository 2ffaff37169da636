#!/usr/bin/env bash
# GPU check (issue: prove it is fast): tokens/s and MFU of a ~1B-parameter Llama-style model on one
# GPU (bf16, ZeRO-2, sequence 2048, activation checkpointing off and on), in at most 8 minutes.
# Prints one JSON line; exit 0 when it ran (see "met" for the MFU goal of 50%), 2 without a GPU.
#
#   bash bench/gpu_check.sh     # dist_train installed (pip install -e .); PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# The model's one JSON line goes to stdout; everything else (DeepSpeed, warnings) to stderr.
exec timeout --signal=TERM 480 "${PYTHON:-python3}" -m bench.gpu_check 2> >(grep -v '^\s*$' >&2)
