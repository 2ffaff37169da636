"""Standard benchmarks on any Hugging Face causal LM directory, through EleutherAI's
lm-evaluation-harness (`pip install 'dist_train[eval]'`).

`dist-train eval EXPORT --tasks ...` and `pretrain.eval.lm_eval` both come here. The harness's own
tasks download their data from the Hugging Face hub; `include_path` adds task YAMLs of your own (for
example multiple choice over local jsonl files), which need no network.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_train.config.loader import ConfigError


class HarnessError(ConfigError):
    """The harness cannot run as asked; the message names the fix."""


def check_harness(include_path: str | None) -> None:
    """Fail early, in one line, when the harness is missing or include_path is not a directory."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise HarnessError("lm-evaluation-harness is not installed: pip install 'dist_train[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"the task directory {include_path!r} (--include-path, or "
                           "pretrain.eval.lm_eval.include_path) is not a directory of task YAMLs: fix the path")


def check_causal(model_dir: str | Path) -> None:
    """The harness scores causal LMs (log-likelihoods of continuations): refuse anything else."""
    config_path = Path(model_dir) / "config.json"
    if not Path(model_dir).exists():
        raise HarnessError(f"{model_dir} does not exist: pass a model directory, e.g. <output_dir>/pretrain/export")
    if not config_path.is_file():
        raise HarnessError(f"{model_dir} is not a Hugging Face model directory (no config.json): pass an export")
    arch = (json.loads(config_path.read_text()).get("architectures") or ["?"])[0]
    if not arch.endswith("ForCausalLM"):
        raise HarnessError(f"{model_dir} holds a {arch}; the harness scores causal LMs only (a masked LM has no "
                           "next-token likelihoods): evaluate a clm export")


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """The harness's task registry (its own tasks and those in include_path); a HarnessError names a task
    it does not know. Takes some seconds: it reads every task definition."""
    check_harness(include_path)
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = f" or in {include_path}" if include_path else (
            "; tasks of your own need their directory (--include-path, or pretrain.eval.lm_eval.include_path)")
        raise HarnessError(f"lm_eval task {unknown[0]!r} is not in the harness{hint}: check the name "
                           "(lm-eval ls tasks lists them)")
    return manager


def run_harness(model_dir: str | Path, tasks: list[str], *, include_path: str | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                device: str = "cpu", seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the model in `model_dir` (its own tokenizer), e.g.
    {"hellaswag": {"acc": 0.41, "acc_stderr": 0.005, "acc_norm": ...}}. Deterministic for a seed."""
    check_causal(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    manager = task_manager(tasks, include_path)
    # The harness narrates loading and progress on stdout/stderr, and its `git describe` writes to the
    # process's own stderr: our caller prints what matters.
    try:
        with quiet_output():
            out = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=list(tasks),
                task_manager=manager, batch_size=batch_size, device=device, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as e:  # a missing dataset, a device that is not there, a broken task YAML: one line
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        text = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        hint = (": the harness's own tasks download their data; where a hub is reachable set HF_HUB_OFFLINE=0 and "
                "HF_DATASETS_OFFLINE=0" if any(w in text.lower() for w in ("offline", "connect", "hub")) else "")
        raise HarnessError(f"lm-evaluation-harness could not score {model_dir} ({text[:300]}){hint}") from None
    return {task: clean(values) for task, values in (out or {}).get("results", {}).items()}


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Silence Python's stdout/stderr and the file descriptors under them (what subprocesses write)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def clean(values: dict[str, Any]) -> dict[str, float]:
    """The harness's "acc,none" keys as "acc" (other filters keep their suffix), numbers only."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
            metric, _, filt = key.partition(",")
            out[metric if filt in ("", "none") else f"{metric}/{filt}"] = float(value)
    return out


def format_results(results: dict[str, dict[str, float]]) -> str:
    """One line per task: its metrics (standard errors as ±)."""
    lines = []
    for task, metrics in results.items():
        parts = [f"{k} {v:.4f}" + (f" ±{metrics[k + '_stderr']:.4f}" if k + "_stderr" in metrics else "")
                 for k, v in metrics.items() if not k.endswith("_stderr")]
        lines.append(f"{task}: {' · '.join(parts)}")
    return "\n".join(lines)
