"""The Python API for notebooks and scripts: what `dist-train run` does, as functions.

    from dist_train import load_config, run
    cfg = load_config("configs/quickstart.yaml", ["pretrain.train.max_steps=20"])
    report = run(cfg)                      # same checks, same Ray + DeepSpeed run, same outputs
    report["stages"]["finetune"]["test"]   # the report.json contents

Mistakes raise ConfigError/DataError/ModelError (one-line messages) before Ray starts; a failed
stage raises RunFailed, a SIGTERM-stopped run raises Preempted after its checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dist_train.config.schema import RunConfig


def load_config(source: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> RunConfig:
    """A typed, validated config from a YAML path, a plain dict (as in the YAML) or the defaults
    (None), with overrides: `a.b.c=value` strings (values parsed as YAML, as on the command line),
    or a dict {"a.b.c": value} of Python values, taken as they are."""
    import copy

    from dist_train.config.loader import ConfigError, apply_override, from_dict, interpolate, read_yaml, set_key

    if source is None or isinstance(source, (str, Path)):
        raw = read_yaml(source) if source is not None else {}
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        raise ConfigError(f"load_config takes a YAML path, a dict or None, not {type(source).__name__}")
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_key(raw, key, copy.deepcopy(value))
    else:
        for item in overrides:
            apply_override(raw, item)
    return from_dict(interpolate(raw))


def run(config: RunConfig | str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (),
        stage: str | None = None) -> dict[str, Any]:
    """Validate, prepare, train the configured stages (or `stage` alone) and return the report
    (also written to OUTPUT_DIR/report.json). Ray starts locally unless ray.address (or
    RAY_ADDRESS) names a cluster; a Ray instance this process already started is reused."""
    from dist_train.config.loader import to_dict
    from dist_train.launch.driver import run as run_driver

    if isinstance(config, RunConfig):
        cfg = load_config(to_dict(config), overrides) if overrides else config
    else:
        cfg = load_config(config, overrides)
    return run_driver(cfg, stage)
