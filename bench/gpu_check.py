"""GPU check: tokens/s and MFU of a ~1B-parameter Llama-style model on one GPU, bf16, ZeRO-2,
sequence 2048, activation checkpointing off and on. Prints one JSON line. Run by bench/gpu_check.sh.

It trains with dist_train's own pieces (model builder, rendered DeepSpeed config, data plan and
loader, loss, engine) in one process, without Ray: the step is what a GPU measures. MFU uses the
data-sheet bf16 peak (989 TFLOP/s on H100/H200, dist_train's table) and also reports the measured
peak of an 8192³ bf16 matmul.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

SEQ, MICRO, STEPS = 2048, 8, 12
ARCH = {"family": "llama", "hidden_size": 2048, "num_layers": 20, "num_heads": 16, "intermediate_size": 5632,
        "max_position_embeddings": SEQ}


def config_text(data: Path, out: Path, checkpointing: bool) -> str:
    from bench.workload import pretrain_config

    return pretrain_config(data=data, out=out, arch=ARCH, seq=SEQ, micro=MICRO, workers=1, steps=1000, lr=3.0e-4,
                           use_gpu=True, cpus_per_worker=8, checkpointing=checkpointing)


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU visible: run bench/gpu_check.sh on a GPU machine"}))
        return 2
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    from bench.mfu import CommTimer, train_variant
    from dist_train.data.quickstart import prepare_python_docs
    from dist_train.launch.worker import quiet_libraries
    from dist_train.train.metrics import device_peak_flops, measure_matmul_peak
    from dist_train.world import World

    quiet_libraries()
    t0 = time.perf_counter()
    w = World(device="cuda:0")
    peak, source = device_peak_flops(True, torch.bfloat16, 1)
    measured = measure_matmul_peak(torch.bfloat16, 1, device="cuda", n=8192, seconds=2.0)
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "seq_len": SEQ,
                 "micro_batch": MICRO, "zero_stage": 2, "precision": "bf16", "peak_flops": peak,
                 "peak_source": source, "measured_matmul_flops": measured}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_python_docs(Path(tmp) / "data", seq_len=SEQ, vocab_size=32000, progress=False)
        out["data_build_s"] = round(time.perf_counter() - t0, 1)
        comm = CommTimer()
        for checkpointing in (False, True):
            config = Path(tmp) / f"ac-{checkpointing}.yaml"
            config.write_text(config_text(data, Path(tmp) / "run", checkpointing))
            torch.cuda.reset_peak_memory_stats()
            r = train_variant(w, config, {"checkpointing": checkpointing}, comm, steps=STEPS)
            key = "ac_on" if checkpointing else "ac_off"
            out["flops_per_token"] = r["flops_per_token"]
            out[key] = {"tokens_per_s": round(r["tokens_per_s"]), "mfu": round(r["flops_per_token"] * r["tokens_per_s"]
                                                                            / peak, 4),
                        "step_s": round(r["phases"]["step"], 4), "max_memory_gib": round(r["max_memory_gib"], 1)}
            torch.cuda.empty_cache()
    out["params_from_flops"] = round((out["flops_per_token"] - 12 * ARCH["num_layers"] * ARCH["hidden_size"] * SEQ) / 6)
    out["goal_mfu"] = 0.50
    out["met"] = max(out["ac_off"]["mfu"], out["ac_on"]["mfu"]) >= 0.50
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
