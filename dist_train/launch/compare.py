"""What adaptation bought, measured by the driver once a stage's workers are done.

finetune.compare_base: the unadapted run is the same fine-tune (settings, seed, data) started from
model.name_or_path, or from the inline architecture freshly initialised, in OUTPUT_DIR/compare_base/
(its own checkpoints, export and resume). Both runs leave per-example test statistics; the driver
compares them with a paired bootstrap (tasks/compare.py).

pretrain.eval.lm_eval: the starting model and the export are scored by lm-evaluation-harness in a Ray
task with one worker's resources (its GPU, when workers have one), so no rank waits in a collective
while a benchmark runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dist_train.config.schema import FaultsConfig, RunConfig, best_metric, higher_is_better
from dist_train.outputs import COMPARE_BASE, TEST_STATS


def base_config(cfg: RunConfig) -> RunConfig:
    """The unadapted fine-tune: identical settings and seed, its own output directory, no trackers
    (the comparison reaches them through the report), no injected faults."""
    rep = dataclasses.replace
    return rep(cfg, output_dir=str(Path(cfg.output_dir) / COMPARE_BASE), prepare=None, pretrain=None,
               finetune=rep(cfg.finetune, init_from=None), logging=rep(cfg.logging, trackers=()),
               faults=FaultsConfig())


def compare(cfg: RunConfig, base_cfg: RunConfig, resamples: int = 2000) -> dict[str, Any]:
    """The paired bootstrap of the adapted fine-tune against the unadapted one on the test set, by
    finetune's best_metric (or the task's main metric)."""
    from dist_train.model.build import load_tokenizer
    from dist_train.tasks import build_task
    from dist_train.tasks.compare import ExampleStats, paired_bootstrap, sentence
    from dist_train.tasks.records import read_splits, task_spec

    ft = cfg.finetune
    train, _, _ = read_splits(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
    task = build_task(ft.task, task_spec(cfg), tokenizer, train)
    metric = best_metric(cfg, "finetune")
    if metric not in task.metrics_names:
        metric = task.metrics_names[0]
    result = paired_bootstrap(ExampleStats.load(Path(cfg.output_dir) / "finetune" / TEST_STATS),
                              ExampleStats.load(Path(base_cfg.output_dir) / "finetune" / TEST_STATS),
                              task.metrics, metric, higher_is_better(metric, ft.train.best_mode),
                              resamples=resamples, seed=cfg.seed)
    result["base_model"] = cfg.model.name_or_path or "model.arch, freshly initialised"
    result["summary"] = sentence(result)
    return result


def _harness_task(model_dir: str, tasks: list[str], options: dict[str, Any]) -> dict[str, Any]:
    from dist_train.evaluate.harness import run_harness

    return run_harness(model_dir, tasks, **options)


def benchmarks(cfg: RunConfig, export_dir: str, env: dict[str, str], log=print) -> dict[str, Any]:
    """pretrain.eval.lm_eval: {"start": {task: metrics}, "end": {...}}, or {"error": the reason} when the
    harness failed (the stage's training stands either way)."""
    import ray

    from dist_train.evaluate.harness import format_results

    lm = cfg.pretrain.eval.lm_eval
    models = {"start": cfg.model.name_or_path, "end": export_dir}
    options = {"include_path": lm.include_path, "limit": lm.limit, "num_fewshot": lm.num_fewshot,
               "batch_size": lm.batch_size, "device": "cuda" if cfg.ray.use_gpu else "cpu", "seed": cfg.seed}
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)(_harness_task)
    results: dict[str, Any] = {}
    for when in lm.at:
        if models[when] is None:  # a from-scratch run has no starting model worth scoring
            continue
        log(f"[pretrain] lm_eval: scoring the {'starting model' if when == 'start' else 'export'} on "
            f"{', '.join(lm.tasks)}")
        try:
            results[when] = ray.get(task.options(runtime_env={"env_vars": env}).remote(
                models[when], list(lm.tasks), options))
        except Exception as e:  # the harness's own failure, in one line: training is not undone by it
            cause = getattr(e, "cause", None) or e
            lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
            reason = f"{type(cause).__name__}: {lines[-1] if lines else ''}"
            log(f"[pretrain] lm_eval failed on {models[when]}: {reason}")
            return {**results, "error": reason}
        for line in format_results(results[when]).splitlines():
            log(f"[pretrain] lm_eval {when}: {line}")
    return results
