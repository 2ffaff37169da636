"""finetune.compare_base: fine-tune the unadapted model beside the adapted one and compare them.

The unadapted run is the same fine-tune (settings, seed, data) started from model.name_or_path, or
from the inline architecture freshly initialised, in OUTPUT_DIR/compare_base/ (its own checkpoints,
export and resume). Both runs leave per-example test statistics; the driver compares them with a
paired bootstrap (tasks/compare.py).
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
