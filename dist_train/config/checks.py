"""Checks that need the filesystem, run on the driver before Ray starts.

`resolve_paths` turns relative paths into absolute ones (workers do not share the driver's
working directory); `check_run` verifies that data, tokenizer and model fit together, so a bad
config never costs a cluster allocation. Paths inside `prepare.dir` that are not built yet are
accepted: `run` builds them first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dist_train.config.derived import derive_stage, init_dir, stage_precision, stage_section
from dist_train.config.hardware import cpu_has_bf16, cpu_has_fp16
from dist_train.config.loader import ConfigError
from dist_train.config.schema import (
    DeepSpeedSection,
    RunConfig,
    baseline_on,
    best_metric,
    measures_forgetting,
    stage_metrics,
)


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else path


def _abs_if_local(name: str | None) -> str | None:
    """Hub ids stay as they are; anything that exists locally, or looks like a path, becomes absolute.
    `pkg:PACKAGE/sub/dir` names a directory shipped inside an installed Python package."""
    if name is None:
        return None
    if name.startswith("pkg:"):
        import importlib.util

        package, _, sub = name[4:].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{name!r}: Python package {package!r} is not installed: pip install "
                              f"{package.replace('_', '-')}")
        return str(Path(spec.submodule_search_locations[0], sub).resolve())
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() or name.startswith((".", "/", "~")) else name


def resolve(cfg: RunConfig, notes: list[str] | None = None, use_gpu: bool | None = None) -> RunConfig:
    """Absolute paths, the data plan pinned to the checkpoint a run resumes from, and each stage's
    precision `auto` made concrete (for GPUs if `use_gpu`, default ray.use_gpu); what `auto` became, and
    why, is appended to `notes` if given."""
    return resolve_precision(pin_resumed_lanes(resolve_paths(cfg)), notes, use_gpu)


def resolve_precision(cfg: RunConfig, notes: list[str] | None = None, use_gpu: bool | None = None) -> RunConfig:
    """Each stage's `deepspeed.precision: auto` replaced by a concrete one: the precision of the checkpoints
    the stage resumes from (a DeepSpeed checkpoint does not load into another precision), else stage_precision's."""
    rep = dataclasses.replace
    for stage in ("pretrain", "finetune"):
        section = getattr(cfg, stage)
        if section is None or section.deepspeed.precision != "auto":
            continue
        if kept := _checkpoint_precision(Path(cfg.output_dir) / stage / "checkpoints", stage):
            value, why = kept[1], f"auto: as the checkpoint it resumes from ({kept[0]})"
        else:
            value, why = stage_precision(section.deepspeed, cfg.ray.use_gpu if use_gpu is None else use_gpu)
        cfg = rep(cfg, **{stage: rep(section, deepspeed=rep(section.deepspeed, precision=value))})
        if notes is not None:
            notes.append(f"[{stage}] precision: {value} ({why})")
    return cfg


def _checkpoint_precision(root: Path, stage: str) -> tuple[str, str] | None:
    """(tag, precision) of the newest committed checkpoint whose meta.json names one: the workers resume
    from the newest that verifies, whether or not `latest` points at it."""
    import json

    from dist_train.checkpoint.manager import META, committed_tags

    for tag in committed_tags(root) if root.is_dir() else []:
        try:
            meta = json.loads((root / tag / META).read_text())
        except (OSError, ValueError):
            continue  # damaged: the workers skip it, saying so
        kept = _lookup((meta.get("config") if isinstance(meta, dict) else None) or {}, f"{stage}.deepspeed.precision")
        if kept in ("bf16", "fp16", "fp32"):
            return tag, str(kept)
    return None


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """The same config with every local path absolute."""
    rep = dataclasses.replace
    cfg = rep(cfg, output_dir=_abs(cfg.output_dir),
              model=rep(cfg.model, name_or_path=_abs_if_local(cfg.model.name_or_path),
                        tokenizer=_abs_if_local(cfg.model.tokenizer)))
    if cfg.prepare is not None:
        cfg = rep(cfg, prepare=rep(cfg.prepare, dir=_abs(cfg.prepare.dir),
                                   tokenizer=_abs_if_local(cfg.prepare.tokenizer)))
    for stage in ("pretrain", "finetune"):
        section = getattr(cfg, stage)
        if section is not None and section.deepspeed.config_file:
            cfg = rep(cfg, **{stage: rep(section, deepspeed=embed_deepspeed_file(section.deepspeed, stage))})
    if cfg.pretrain is not None:
        from dist_train.data.sources import is_url

        def source(path: str) -> str:
            return path if is_url(path) else _abs(path)

        data, ev = cfg.pretrain.data, cfg.pretrain.eval
        cfg = rep(cfg, pretrain=rep(cfg.pretrain, data=rep(
            data, shards=source(data.shards), mix=tuple(rep(m, shards=source(m.shards)) for m in data.mix)),
            eval=rep(ev, sets=tuple(rep(s, path=source(s.path)) for s in ev.sets),
                     lm_eval=rep(ev.lm_eval, include_path=_abs(ev.lm_eval.include_path)))))
    if cfg.finetune is not None:
        d = cfg.finetune.data
        init = cfg.finetune.init_from
        cfg = rep(cfg, finetune=rep(cfg.finetune, init_from=init if init == "pretrain" else _abs_if_local(init),
                                    data=rep(d, train=_abs(d.train), validation=_abs(d.validation),
                                             test=_abs(d.test))))
    return cfg


def embed_deepspeed_file(ds: DeepSpeedSection, stage: str) -> DeepSpeedSection:
    """The section with `config_file` made absolute and its JSON merged into `extra`, so workers
    on other hosts receive its contents rather than a path they may not see."""
    import json

    path = Path(ds.config_file).expanduser().resolve()
    key = f"{stage}.deepspeed.config_file"
    if not path.is_file():
        raise ConfigError(f"{key}={ds.config_file!r} not found: give the path of a DeepSpeed JSON file")
    try:
        user = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}={str(path)!r} is not valid JSON ({e}): fix the file") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{key}={str(path)!r} must hold a JSON object (a DeepSpeed config), "
                          f"not {type(user).__name__}")
    for k, v in ds.extra.items():  # the inline keys and the file must not disagree either
        if k in user and user[k] != v:
            raise ConfigError(f"{stage}.deepspeed.extra.{k}={json.dumps(v)} disagrees with {k}="
                              f"{json.dumps(user[k])} in {path}: keep one of them")
    return dataclasses.replace(ds, config_file=str(path), extra={**user, **ds.extra})


# Keys a resumed run must share with the checkpoint it resumes: they decide the model's shape,
# the data plan and the optimizer's partitioning. (Cadence, max_steps and lr may change.)
# The worker count may change: the data plan depends on lanes, not workers, and a checkpoint
# written by another worker count is converted to DeepSpeed's universal format on load.
# What the checkpoint means is in it too: the objective or task, the labels' source and fields, the
# adapters, the precision, the starting weights.
RESUME_IDENTITY = ("seed", "model", "{stage}.objective", "{stage}.task", "{stage}.init_from",
                   "{stage}.data.shards", "{stage}.data.mix", "{stage}.data.seq_len", "{stage}.data.window_shards",
                   "{stage}.data.train", "{stage}.data.validation",
                   "{stage}.data.validation_fraction", "{stage}.data.test_fraction", "{stage}.data.text_field",
                   "{stage}.data.text_pair_field", "{stage}.data.label_field", "{stage}.data.tokens_field",
                   "{stage}.data.tags_field", "{stage}.data.prompt_field", "{stage}.data.response_field",
                   "{stage}.data.max_length", "{stage}.lora.enabled", "{stage}.lora.r", "{stage}.lora.alpha",
                   "{stage}.lora.target_modules", "{stage}.deepspeed.zero_stage", "{stage}.deepspeed.precision",
                   "{stage}.train.global_batch_size", "{stage}.train.head_warmup_steps",
                   # the step-0 baseline in a checkpoint is of these sets: others would not compare
                   "{stage}.eval.sets", "{stage}.eval.samples")


def pin_resumed_lanes(cfg: RunConfig) -> RunConfig:
    """On resume, an unset pretrain.data.lanes takes the value the checkpoint was planned with
    (its default, the worker count, may have changed since): the plan must not change."""
    from dist_train.checkpoint.manager import latest_meta

    found = latest_meta(Path(cfg.output_dir) / "pretrain" / "checkpoints") if cfg.pretrain is not None else None
    if found is None:
        return cfg
    tag, meta = found
    planned = meta.get("plan", {}).get("lanes")
    configured = cfg.pretrain.data.lanes
    if configured is not None and planned is not None and configured != planned:
        raise ConfigError(f"{cfg.output_dir} holds a pretrain checkpoint ({tag}) planned with {planned} lanes, but "
                          f"pretrain.data.lanes={configured}: use a new output_dir, or set lanes={planned}")
    if configured is None and planned is not None:
        rep = dataclasses.replace
        cfg = rep(cfg, pretrain=rep(cfg.pretrain, data=rep(cfg.pretrain.data, lanes=planned)))
    return cfg


ABSENT = object()  # a key a config (of an older version) does not have


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, ABSENT) if isinstance(tree, dict) else ABSENT
    return tree


def check_resume(cfg: RunConfig, stage: str) -> str | None:
    """If output_dir holds committed checkpoints of `stage`, check they fit this config.

    Returns the newest committed tag (None when the stage starts fresh). Every committed checkpoint
    with a readable meta.json is checked, since the workers may fall back to an older one when the
    newest is damaged. Changing a key in RESUME_IDENTITY would silently mix two runs, so it is an
    error that names the key.
    """
    import json

    from dist_train.checkpoint.manager import META, committed_tags
    from dist_train.config.loader import to_dict

    root = Path(cfg.output_dir) / stage / "checkpoints"
    tags = committed_tags(root) if root.is_dir() else []
    new = to_dict(cfg)
    for tag in tags:
        try:
            meta = json.loads((root / tag / META).read_text())
        except (OSError, ValueError):
            continue  # damaged: the workers skip it, saying so
        old = (meta.get("config") if isinstance(meta, dict) else None) or {}
        lora_off = not _lookup(old, f"{stage}.lora.enabled") and not _lookup(new, f"{stage}.lora.enabled")
        for key in (k.format(stage=stage) for k in RESUME_IDENTITY):
            if lora_off and key.startswith(f"{stage}.lora."):
                continue  # adapters that are off in both: their settings mean nothing
            was, now = _lookup(old, key), _lookup(new, key)
            if was is not ABSENT and was != now:  # absent: a checkpoint of a version without the key
                shown = f"no {key}" if now is ABSENT else f"{key}={json.dumps(now)}"
                start = "model.name_or_path" if stage == "pretrain" else "finetune.init_from"
                raise ConfigError(f"{cfg.output_dir} holds a {stage} checkpoint ({tag}) made with {key}="
                                  f"{json.dumps(was)}, but this config has {shown}: to resume it, restore {key}; "
                                  f"to start a new run, use a new output_dir (and to start from this run's weights, "
                                  f"`dist-train export` its checkpoint and set {start} to the export)")
    return tags[0] if tags else None


def _pending(cfg: RunConfig, path: str) -> bool:
    """True when `path` lies inside a prepare.dir that `run` will build."""
    if cfg.prepare is None:
        return False
    root = Path(cfg.prepare.dir).resolve()
    return Path(path).resolve().is_relative_to(root) and not (root / "READY.json").is_file()


def _check_best_metric(cfg: RunConfig, stage: str) -> list[str]:
    train = getattr(cfg, stage).train
    metric = best_metric(cfg, stage)
    if metric is None:
        if train.export == "best" or train.early_stopping_patience:
            raise ConfigError(f"{stage}.train.export=best and early stopping need {stage}.train.best_metric: "
                              "set it (or auto)")
        return []
    known = stage_metrics(cfg, stage)
    if metric not in known:
        what = f"the {cfg.finetune.task} task" if stage == "finetune" else "the pretrain evaluation"
        raise ConfigError(f"{stage}.train.best_metric={metric!r} is not a metric {what} reports: "
                          f"use one of {list(known)}, auto, or null")
    if train.early_stopping_patience:  # then every evaluation saves: the best is always rankable
        return []
    if train.save_every and train.eval_every and train.save_every % train.eval_every:
        return [f"{stage}: checkpoints at steps without an evaluation cannot be ranked by {metric}: make "
                f"train.save_every ({train.save_every}) a multiple of train.eval_every ({train.eval_every})"]
    return []


def _check_faults(cfg: RunConfig) -> None:
    from dist_train.faults import ALLOW_ENV, allowed

    f = cfg.faults
    if not f.active():
        return
    if not allowed():
        raise ConfigError(f"faults.* injects failures on purpose (it is for tests): remove the faults section, or set "
                          f"{ALLOW_ENV}=1 if you really mean to break this run")
    for rank, what in [(f.rank, "faults.rank"), *((s.rank, f"faults.save (step {s.step})") for s in f.save)]:
        if rank >= cfg.ray.num_workers:
            raise ConfigError(f"{what}={rank} but the run has {cfg.ray.num_workers} workers: pick a rank below that")
    for s in f.save:
        if s.rank != 0 and s.phase in ("staged", "renamed", "committed"):
            raise ConfigError(f"faults.save phase {s.phase} happens on rank 0 only: set rank: 0")


def epochs_note(steps: int, batch: float, available: int, unit: str) -> str:
    """How many passes over the data `steps` optimizer steps drawing `batch` items of it make, in words."""
    seen = steps * batch
    return (f"max_steps={steps} × {batch:g} {unit} per step = {seen:,.0f} {unit}, "
            f"{seen / max(available, 1):.2f} epochs")


def _check_attention(cfg: RunConfig, stages: list[str]) -> None:
    """model.attention=flash_attention_2 asked for explicitly: a GPU, the flash_attn package (where the driver
    runs: the same image as the workers) and a half-precision stage."""
    if cfg.model.attention != "flash_attention_2":
        return
    from dist_train.model.attention import flash_attn_importable

    if not cfg.ray.use_gpu:
        raise ConfigError("model.attention=flash_attention_2 needs CUDA GPUs: set ray.use_gpu=true, or "
                          "model.attention=auto (sdpa on CPU)")
    if not flash_attn_importable():
        raise ConfigError("model.attention=flash_attention_2 needs the flash_attn package, which this Python lacks: "
                          "pip install flash-attn (CUDA builds), or model.attention=auto")
    for stage in stages:
        if getattr(cfg, stage).deepspeed.precision == "fp32":
            raise ConfigError(f"model.attention=flash_attention_2 has no fp32 kernel, and {stage} runs in fp32: set "
                              f"{stage}.deepspeed.precision=bf16, or model.attention=auto")


def check_run(cfg: RunConfig, stages: list[str]) -> list[str]:
    """Raise ConfigError/DataError/ModelError for anything that would fail later; return notes."""
    from dist_train.data.manifest import read_manifest
    from dist_train.model.build import check_remote_code, load_tokenizer, model_vocab_size

    notes: list[str] = []
    out = Path(cfg.output_dir)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output_dir {cfg.output_dir!r}: {str(parent)!r} is a file, not a directory: "
                              "choose another output_dir")
    if cfg.prepare is not None:
        from dist_train.data.quickstart import check_prepare_dir

        check_prepare_dir(cfg.prepare.dir)  # a folder of the user's is refused before anything is built
    model = cfg.model
    # a fine-tune alone may name its model by finetune.init_from only (weights, config and tokenizer)
    by_init = stages == ["finetune"] and init_dir(cfg) is not None and model.name_or_path is None and model.arch is None
    if model.name_or_path is not None and model.arch is not None:
        raise ConfigError("set exactly one of model.name_or_path (pretrained) and model.arch (from scratch)")
    if model.name_or_path is None and model.arch is None and not by_init:
        raise ConfigError("set model.name_or_path (pretrained) or model.arch (from scratch); a fine-tune alone can "
                          "instead start from a model directory in finetune.init_from")
    if not stages:
        raise ConfigError("no stage to run: add a `pretrain:` or `finetune:` section")
    _check_faults(cfg)
    _check_attention(cfg, stages)
    from dist_train.launch.trackers import check_trackers

    check_trackers(cfg.logging)
    check_remote_code(model.name_or_path, model.trust_remote_code)  # load_tokenizer checks the tokenizer
    for stage in stages:
        stage_section(cfg, stage)
        derive_stage(cfg, stage)
        precision = getattr(cfg, stage).deepspeed.precision
        if precision == "fp16" and not cfg.ray.use_gpu and not cpu_has_fp16():
            raise ConfigError(f"{stage}.deepspeed.precision=fp16 needs native fp16 kernels, which this CPU lacks "
                              "(DeepSpeed refuses it): use auto, or fp16 with ray.use_gpu=true")
        if precision == "bf16" and not cfg.ray.use_gpu and not cpu_has_bf16():
            notes.append(f"note: {stage} runs in bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): its "
                         "matmuls are emulated, several times slower than fp32 (8x on the quickstart); a new run with "
                         "precision=auto takes fp32 here")
        notes += _check_best_metric(cfg, stage)
        train = getattr(cfg, stage).train
        if stage == "pretrain" and train.head_warmup_steps and model.arch is not None:
            notes.append("pretrain.train.head_warmup_steps: a model.arch starts entirely at random, so there is no "
                         "head to warm up alone; it is ignored")
        if train.head_warmup_steps is not None and train.head_warmup_steps >= train.max_steps:
            raise ConfigError(f"{stage}.train.head_warmup_steps={train.head_warmup_steps} leaves no step for the rest "
                              f"of the model (max_steps={train.max_steps}): use fewer warm-up steps")
        if (tag := check_resume(cfg, stage)) is not None:
            notes.append(f"{stage} will resume from {tag}")
        for key, what in (("eval_every", "evaluation"), ("save_every", "checkpoint")):
            every = getattr(train, key)
            if every > train.max_steps:
                notes.append(f"{stage}.train.{key}={every} is beyond max_steps={train.max_steps}: only the final "
                             f"{what} happens (0 says so on purpose)")

    tokenizer_name = model.tokenizer or model.name_or_path or (init_dir(cfg) if by_init else None)
    if tokenizer_name is None:
        raise ConfigError("model.tokenizer is not set: name a tokenizer directory (model.arch has none)")
    tokenizer = None
    if not _pending(cfg, tokenizer_name):
        tokenizer = load_tokenizer(tokenizer_name, model.trust_remote_code)
        vocab = model_vocab_size(model.name_or_path or init_dir(cfg), model.arch, len(tokenizer))
        if len(tokenizer) > vocab:
            raise ConfigError(f"tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but the model embeds "
                              f"only {vocab}: use the model's own tokenizer or raise model.arch.vocab_size")
    max_pos = model.arch.max_position_embeddings if model.arch else None

    if "pretrain" in stages:
        data = cfg.pretrain.data
        if _pending(cfg, data.shards):
            notes.append(f"pretrain.data.shards {data.shards} will be built by prepare")
        else:
            man = read_manifest(data.shards, allow_pipe=data.allow_pipe)
            if man.seq_len != data.seq_len:
                raise ConfigError(f"pretrain.data.seq_len={data.seq_len} but the shards in {data.shards} hold "
                                  f"samples of {man.seq_len} tokens: set seq_len={man.seq_len} or rebuild")
            if tokenizer is not None and man.vocab_size != len(tokenizer):
                raise ConfigError(f"the shards in {data.shards} were tokenized with "
                                  f"{man.tokenizer['name_or_path']!r} ({man.vocab_size} tokens), not with "
                                  f"{tokenizer_name!r} ({len(tokenizer)}): use that tokenizer or rebuild")
            from dist_train.train.pretrain import plan_of, read_sources

            plan_of(cfg, read_sources(cfg), derive_stage(cfg, "pretrain")).check(cfg.ray.num_workers)
            samples = sum(s.samples for s in man.train)
            share = 1.0 - sum(m.weight for m in data.mix)  # the main corpus's part of every batch
            notes.append(f"pretrain data: {len(man.train)} shards, {samples} samples of {man.seq_len} tokens; "
                         + epochs_note(cfg.pretrain.train.max_steps, cfg.pretrain.train.global_batch_size * share,
                                       samples, "samples" + (" of this corpus" if data.mix else "")))
        if max_pos is not None and data.seq_len > max_pos:
            raise ConfigError(f"pretrain.data.seq_len={data.seq_len} exceeds model.arch.max_position_embeddings="
                              f"{max_pos}: lower seq_len or raise max_position_embeddings")
        notes += _check_eval_sets(cfg)

    if "finetune" in stages:
        ft = cfg.finetune
        import glob

        if ft.data.packing and ft.task != "sft":
            raise ConfigError(f"finetune.data.packing=true packs causal-LM examples, and task {ft.task!r} is not "
                              "one: set it to false (length grouping already keeps its padding low)")
        if ft.data.packing and cfg.model.trust_remote_code:
            raise ConfigError("finetune.data.packing=true confines attention through position_ids, which a model's "
                              "remote code may ignore (examples would see each other): set packing to false")

        for name in ("train", "validation", "test"):
            path = getattr(ft.data, name)
            if path and not _pending(cfg, path) and not Path(path).exists() and not glob.glob(path):
                raise ConfigError(f"finetune.data.{name} {path!r} not found: fix the path")
        init = ft.init_from
        if init == "pretrain":
            export = Path(cfg.output_dir) / "pretrain" / "export"
            if "pretrain" not in stages and not (export / "config.json").is_file():
                raise ConfigError(f"finetune.init_from=pretrain but {export} holds no export: run the "
                                  "pretrain stage first, or set finetune.init_from to an HF model directory")
        elif init is None and model.name_or_path is None and model.arch is None:
            raise ConfigError("finetune.init_from is null and model.name_or_path is unset: "
                              "name the weights to fine-tune")
        elif init is not None and not (Path(init) / "config.json").is_file():
            raise ConfigError(f"finetune.init_from {init!r} is not an HF model directory (no config.json): "
                              "point it at an export directory")
        elif init is not None:
            check_remote_code(init, model.trust_remote_code)
        if max_pos is not None and ft.data.max_length > max_pos:
            raise ConfigError(f"finetune.data.max_length={ft.data.max_length} exceeds "
                              f"model.arch.max_position_embeddings={max_pos}: lower it")
        notes += _check_finetune_task(cfg, tokenizer)
        notes += _check_compare_base(cfg)
    return notes


def _check_eval_sets(cfg: RunConfig) -> list[str]:
    """Every evaluation set exists and is tokenized like the training data (text corpora: readable),
    and the forgetting options have something to act on."""
    from dist_train.data.evalsets import check_corpus, check_fits, check_shard_path, eval_sources, usable
    from dist_train.data.manifest import read_manifest

    sec = cfg.pretrain
    sources = eval_sources(cfg)
    main = None if _pending(cfg, sec.data.shards) else read_manifest(sec.data.shards, allow_pipe=sec.data.allow_pipe)
    notes, skipped = [], []
    for s in sources:
        if s.is_corpus and not _pending(cfg, s.path):
            check_corpus(s)
        elif main is not None and not _pending(cfg, s.path):
            check_shard_path(s)
            man = read_manifest(s.path, allow_pipe=sec.data.allow_pipe)
            if not usable(s, man):
                skipped.append(s.name)
                notes.append(f"pretrain evaluation: {s.path} has no validation split, so {s.name!r} is not evaluated "
                             "(rebuild it with --val-fraction, or name a held-out set in pretrain.eval.sets)")
                continue
            check_fits(s.name, man, main)
    sources = [s for s in sources if s.name not in skipped]
    general = [s.name for s in sources if s.role == "general"]
    if sec.eval.stop_on_forgetting and not measures_forgetting(cfg):
        raise ConfigError("pretrain.eval.stop_on_forgetting needs a general evaluation set (a pretrain.data.mix "
                          "source or a pretrain.eval.sets entry with role: general), the baseline "
                          "(pretrain.eval.baseline) and pretrain.eval.max_forgetting")
    if sec.train.best_metric == "adapted_loss" and not measures_forgetting(cfg):
        raise ConfigError("pretrain.train.best_metric=adapted_loss ranks by domain loss within the forgetting limit, "
                          "which needs a general evaluation set, the baseline and pretrain.eval.max_forgetting: add "
                          "them, or rank by loss")
    lm = sec.eval.lm_eval
    if lm.tasks:
        from dist_train.evaluate.harness import task_manager

        if sec.objective != "clm":
            raise ConfigError("pretrain.eval.lm_eval scores causal LMs, and this stage trains a masked LM "
                              "(pretrain.objective=mlm): drop lm_eval.tasks for encoders")
        if not lm.at:
            raise ConfigError("pretrain.eval.lm_eval.tasks are set but lm_eval.at names no model to score: use "
                              "[start, end], or drop the tasks")
        task_manager(list(lm.tasks), lm.include_path)  # a misspelt task fails here, not after training
        notes.append(f"pretrain.eval.lm_eval: {', '.join(lm.tasks)} on the {' and the '.join(lm.at)} model")
    if sec.eval.stop_on_forgetting and sec.train.export != "best":
        notes.append("pretrain.eval.stop_on_forgetting with train.export=last exports the checkpoint that crossed the "
                     "forgetting limit: set pretrain.train.export=best to export the best one within it")
    if sources:
        notes.append(f"pretrain evaluation: {', '.join(f'{s.name} ({s.role})' for s in sources)}"
                     + ("; baseline at step 0" if baseline_on(cfg) else "; no baseline (pretrain.eval.baseline)")
                     + (f"; forgetting limit {sec.eval.max_forgetting:.0%} on {', '.join(general)}"
                        if general and sec.eval.max_forgetting is not None and baseline_on(cfg) else ""))
    return notes


def _check_compare_base(cfg: RunConfig) -> list[str]:
    ft = cfg.finetune
    if not ft.compare_base:
        return []
    if not ft.data.test and not ft.data.test_fraction:
        raise ConfigError("finetune.compare_base compares the two fine-tunes on the test set, and there is none: set "
                          "finetune.data.test or finetune.data.test_fraction")
    if ft.init_from is None or (cfg.model.name_or_path and ft.init_from == cfg.model.name_or_path):
        raise ConfigError("finetune.compare_base compares a fine-tune of the adapted model with one of the unadapted "
                          "model, but finetune.init_from already starts from the unadapted one: set "
                          "finetune.init_from: pretrain (or an adapted export), or drop compare_base")
    if cfg.model.name_or_path is None and cfg.model.arch is None:
        raise ConfigError("finetune.compare_base also fine-tunes the unadapted model, and none is named: set "
                          "model.name_or_path (or model.arch), or drop compare_base")
    base = cfg.model.name_or_path or "model.arch, freshly initialised"
    return [f"finetune.compare_base: then the same fine-tune of the unadapted model ({base}), in "
            f"{Path(cfg.output_dir) / 'compare_base'}"]


def _check_finetune_task(cfg: RunConfig, tokenizer) -> list[str]:
    """Read the labeled data and check task, model and LoRA fit together (what the workers will
    build), so a wrong field name or target module costs no cluster time."""
    import torch
    import transformers

    from dist_train.model.build import check_lora_targets, check_model_fits, lora_config
    from dist_train.tasks import build_task, task_class
    from dist_train.tasks.records import read_splits, task_spec

    ft = cfg.finetune
    if any(p and _pending(cfg, p) for p in (ft.data.train, ft.data.validation, ft.data.test)):
        return []
    init = ft.init_from
    source = None if init == "pretrain" else init or cfg.model.name_or_path
    if init == "pretrain" and (Path(cfg.output_dir) / "pretrain" / "export" / "config.json").is_file():
        source = str(Path(cfg.output_dir) / "pretrain" / "export")
    if source is not None:  # the architecture first: no point reading data for a model that cannot do the task
        check_model_fits(task_class(ft.task).auto_class, transformers.AutoConfig.from_pretrained(source), source)
    train, val, test = read_splits(cfg)
    if tokenizer is not None:
        task = build_task(ft.task, task_spec(cfg), tokenizer, train)
        if source is not None and ft.lora.enabled:
            config = transformers.AutoConfig.from_pretrained(source, **task.model_kwargs())
            with torch.device("meta"):  # the module tree only, no memory
                skeleton = getattr(transformers, task.auto_class).from_config(config)
            check_lora_targets(skeleton, list(lora_config(ft.lora, task.peft_task_type,
                                                          config.model_type).target_modules))
    notes = [f"finetune: {len(train)} train, {len(val or [])} validation, {len(test or [])} test examples; "
             + epochs_note(ft.train.max_steps, ft.train.global_batch_size, len(train), "examples")]
    if not val:
        notes.append("finetune: no validation data (finetune.data.validation, or validation_fraction > 0): nothing is "
                     "evaluated during training, so no best checkpoint is tracked and export=best exports the last")
    if not test:
        notes.append("finetune: no test data (finetune.data.test, or test_fraction > 0): the export is not scored, and "
                     "the report has no test metrics")
    if tokenizer is not None and ft.task == "sequence_classification":
        from dist_train.tasks.heads import label_key

        for name, rows in (("validation", val), ("test", test)):
            unseen = sorted({label_key(r[ft.data.label_field]) for r in rows or []} - set(task.labels))
            if unseen:
                notes.append(f"finetune: the {name} data has {len(unseen)} label(s) the training data lacks "
                             f"({', '.join(map(repr, unseen[:3]))}): the model cannot predict them, so those examples "
                             "count as errors; add training examples of them")
    if ft.train.early_stopping_patience and not val:
        notes.append("finetune: early stopping needs validation data (finetune.data.validation or "
                     "validation_fraction): it will not trigger")
    return notes
