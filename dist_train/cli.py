"""`dist-train`: run | validate | print-config | data build/plan/inspect | export | predict | eval | ledger | report.

Expected user mistakes (ConfigError, DataError, ModelError) print one line and exit 2; no
traceback. Heavy imports (torch, ray, deepspeed) happen only in the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from dist_train.outputs import dumps_strict

EXIT_USER_ERROR = 2
EXIT_CODES = """exit status:
  0   done
  1   a run failed on the cluster (the last line names the stage, step and cause), or ledger verify
      found the ledger wrong
  2   a mistake in the command, config or data, found before anything ran (one line says what to fix)
  75  stopped on request (SIGTERM) after a checkpoint: rerun the same command to resume (Slurm: requeue)
  130 interrupted (Ctrl-C)"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dist_train")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides, e.g. pretrain.train.max_steps=10")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dist-train", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="validate, then train the configured stages on Ray + DeepSpeed")
    _config_args(p)
    p.add_argument("--stage", choices=["pretrain", "finetune"], help="run one stage only")

    p = sub.add_parser("validate", help="check a config (and its data paths) without starting Ray")
    _config_args(p)
    p.add_argument("--stage", choices=["pretrain", "finetune"], help="check one stage only")
    p.add_argument("--plan", action="store_true", help="size the job instead: memory per rank (model states at "
                   "the ZeRO stage, activations with and without checkpointing), checkpoint size, lanes per rank")
    p.add_argument("--nodes", type=int, default=1, help="--plan: nodes in the allocation")
    p.add_argument("--gpus-per-node", type=int, help="--plan: GPUs per node (one rank each); default: "
                   "ray.num_workers ranks")
    p.add_argument("--gpu-memory", help="--plan: memory per GPU, e.g. 80GB; warns when a stage will not fit")
    p.add_argument("--json", action="store_true", help="one JSON object: ok, notes and each stage's derived numbers "
                                                       "(or ok false and the error)")

    p = sub.add_parser("print-config", help="print the resolved config tree")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.add_argument("--deepspeed", action="store_true",
                   help="print the DeepSpeed JSON each stage runs with (typed keys merged with config_file/extra)")
    p.add_argument("--stage", choices=["pretrain", "finetune"], help="--deepspeed: this stage only")

    data = sub.add_parser("data", help="build, plan and inspect token shards").add_subparsers(
        dest="data_cmd", required=True)
    b = data.add_parser("build", help="tokenize + pack raw text into WebDataset shards")
    b.add_argument("--input", required=True, help="file, glob or directory (.jsonl/.txt/.parquet) or saved HF dataset")
    b.add_argument("--output", required=True, help="directory to create")
    b.add_argument("--tokenizer", required=True, help="tokenizer directory or cached HF id")
    b.add_argument("--seq-len", type=int, required=True, help="tokens per packed sample (pretrain.data.seq_len)")
    b.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.csv/.parquet input "
                                                        "(default: %(default)s)")
    b.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default: %(default)s)")
    b.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    b.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: %(default)s)")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier shard directory at --output")
    b.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="tokenizer processes (the output does not depend on it)")
    b.add_argument("--chunk-docs", type=int, default=1024, help="documents per tokenizing task")
    b.add_argument("--max-doc-mb", type=int, default=64,
                   help="refuse a document (a line, or a whole .txt file) larger than this, before reading it")

    tk = data.add_parser("tokenizer", help="train a tokenizer on your corpus (for a model trained from scratch)")
    tk.add_argument("--input", required=True, help="file, glob or directory (.jsonl/.txt/.parquet), as data build")
    tk.add_argument("--output", required=True, help="directory to create (a Hugging Face tokenizer)")
    tk.add_argument("--vocab-size", type=int, required=True, help="entries in the vocabulary, special tokens included")
    tk.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                    help="bpe: byte-level BPE for causal LMs; wordpiece: BERT-style for encoders (default: bpe)")
    tk.add_argument("--text-field", default="text", help="field holding the text (default: %(default)s)")
    tk.add_argument("--overwrite", action="store_true", help="replace an earlier tokenizer at --output")

    pl = data.add_parser("plan", help="print the exact samples each rank gets at each step")
    pl.add_argument("data_dir", help="a shard directory built by `dist-train data build`")
    pl.add_argument("--global-batch", type=int, required=True, help="pretrain.train.global_batch_size")
    pl.add_argument("--world-size", type=int, required=True, help="ray.num_workers")
    pl.add_argument("--lanes", type=int, help="default: the world size")
    pl.add_argument("--window-shards", type=int, default=1, help="pretrain.data.window_shards (default: %(default)s)")
    pl.add_argument("--seed", type=int, default=0, help="the run's seed (default: %(default)s)")
    pl.add_argument("--epoch", type=int, help="count --from-step from the first step of this epoch")
    pl.add_argument("--from-step", type=int, default=0, help="first step to show (default: %(default)s)")
    pl.add_argument("--steps", type=int, default=1, help="steps to show (default: %(default)s)")
    pl.add_argument("--json", action="store_true", help="one JSON object per (step, rank)")
    pl.add_argument("--mix", action="append", default=[], metavar="DIR:WEIGHT",
                    help="a further corpus and its share, as pretrain.data.mix (repeatable)")

    ex = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    ex.add_argument("checkpoint", help="<output_dir>/<stage>/checkpoints/step_N, or a checkpoints dir (latest)")
    ex.add_argument("--output", required=True, help="directory to create")
    ex.add_argument("--adapter", action="store_true", help="LoRA checkpoints: save the adapter alone (peft) "
                                                            "instead of merging it into the model")
    ex.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="precision of the exported weights (default: the stage's train.export_dtype; auto: "
                         "bfloat16 over 1B parameters, else float32)")

    pr = sub.add_parser("predict", help="batch inference with a fine-tune export: one JSON line per input")
    pr.add_argument("export_dir", help="<output_dir>/finetune/export")
    pr.add_argument("--input", required=True, help="records to predict: .jsonl/.csv/.parquet with the training field "
                                                   "names, .txt with one text per line, or - for JSON lines on stdin")
    pr.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                    help="how to read --input: by its suffix (auto; stdin: jsonl), or say so (default: %(default)s)")
    pr.add_argument("--output", help="write here instead of stdout (a new file, unless --overwrite)")
    pr.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    pr.add_argument("--batch-size", type=int, help="records per forward pass (default: the fine-tune's micro batch)")
    for field in ("text", "text-pair", "label", "tokens", "tags", "prompt", "response"):
        pr.add_argument(f"--{field}-field", help=f"the input's field for the task's {field.replace('-', ' ')} "
                                                 "(default: the name used in training)")
    pr.add_argument("--max-new-tokens", type=int, default=64, help="sft: length of generated responses")

    ev = sub.add_parser("eval", help="score a causal-LM export on standard benchmarks (lm-evaluation-harness; "
                                     "pip install 'dist_train[eval]')")
    ev.add_argument("export_dir", help="a Hugging Face causal-LM directory, e.g. <output_dir>/pretrain/export")
    ev.add_argument("--tasks", required=True, help="comma-separated harness task names, e.g. hellaswag,arc_easy")
    ev.add_argument("--include-path", help="a directory of your own task YAMLs (e.g. over local jsonl files)")
    ev.add_argument("--limit", type=int, help="score only the first N examples of each task (a quick look)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    ev.add_argument("--batch-size", type=int, default=8, help="harness batch size (default: %(default)s)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument("--output", help="also write the results as JSON to this file")

    led = sub.add_parser("ledger", help="check what was trained on").add_subparsers(dest="ledger_cmd", required=True)
    lv = led.add_parser("verify", help="prove every sample was trained exactly once per completed epoch")
    lv.add_argument("output_dir", help="the run's output_dir")
    lv.add_argument("--stage", default="pretrain", choices=["pretrain"], help="the stage whose ledger to check")
    lv.add_argument("--json", action="store_true", help="one JSON object (numbers as numbers) instead of text")

    rep = sub.add_parser("report", help="write report.md (and --html) with PNG plots for a run's output_dir")
    rep.add_argument("output_dir", help="the run's output_dir")
    rep.add_argument("--html", action="store_true", help="also write report.html")
    rep.add_argument("--json", action="store_true", help="also print the report's numbers as one JSON object (state, "
                                                         "per stage: steps, tokens, throughput, metrics, attempts)")

    runs = sub.add_parser("runs", help="list the runs under a directory: state, stage, step, best metric, age")
    runs.add_argument("root", nargs="?", default="runs", help="directory holding output_dirs (default: runs)")
    runs.add_argument("--json", action="store_true", help="one JSON object per run")

    ref = sub.add_parser("config-reference", help="print the configuration reference (Markdown) generated "
                                                  "from the typed schema")
    ref.add_argument("--output", help="write it here (docs/configuration.md) instead of stdout")

    ins = data.add_parser("inspect", help="summarize a shard directory and show a sample")
    ins.add_argument("data_dir", help="a shard directory built by `dist-train data build`")
    ins.add_argument("--samples", type=int, default=1, help="samples to decode and show (default: %(default)s)")
    ins.add_argument("--json", action="store_true",
                     help="one JSON object: counts, tokenizer, length histogram, samples")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (`run C --stage finetune a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from dist_train.config.loader import ConfigError
    from dist_train.data.manifest import DataError
    from dist_train.launch.cluster import ClusterError
    from dist_train.model.build import ModelError
    from dist_train.owned import OwnershipError

    try:
        return _dispatch(args)
    except (ConfigError, DataError, ModelError, ClusterError, OwnershipError) as e:
        if getattr(args, "json", False):  # a script reads stdout: the refusal is JSON there too
            print(dumps_strict({"ok": False, "error": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from dist_train.config.loader import ConfigError, load_config, to_dict

    if args.cmd == "print-config" and args.deepspeed:
        from dist_train.config.checks import resolve
        from dist_train.config.derived import derive_stage
        from dist_train.launch.driver import stages_to_run

        cfg = resolve(load_config(args.config, args.overrides))  # as the run derives it (its DeepSpeed JSON merged)
        print(json.dumps({s: derive_stage(cfg, s).deepspeed for s in stages_to_run(cfg, args.stage)}, indent=1))
        return 0
    if args.cmd == "print-config":
        if args.stage:
            raise ConfigError("--stage picks the stage of --deepspeed: add --deepspeed")
        d = to_dict(load_config(args.config, args.overrides))
        print(json.dumps(d, indent=1) if args.json else yaml.safe_dump(d, sort_keys=False), end="")
        return 0
    if args.cmd == "validate":
        from dist_train.config.checks import check_run, resolve
        from dist_train.config.derived import describe
        from dist_train.launch.driver import stages_to_run

        precision_notes: list[str] = []
        sized_for_gpus = True if args.plan and args.gpus_per_node is not None else None
        cfg = resolve(load_config(args.config, args.overrides), precision_notes, use_gpu=sized_for_gpus)
        stages = stages_to_run(cfg, args.stage)
        if args.plan:
            if args.json:
                raise ConfigError("--plan prints a table for people; --json is for validate without --plan")
            return _plan_job(cfg, stages, args)
        if args.nodes != 1 or args.gpus_per_node is not None or args.gpu_memory is not None:
            raise ConfigError("--nodes, --gpus-per-node and --gpu-memory size a plan: add --plan")
        notes = [n for n in precision_notes if n.split("]")[0][1:] in stages] + check_run(cfg, stages)
        if args.json:
            from dataclasses import asdict

            from dist_train.config.derived import derive_stage

            derived = {s: {k: v for k, v in asdict(derive_stage(cfg, s)).items() if k not in ("stage", "deepspeed")}
                       for s in stages}
            print(dumps_strict({"ok": True, "config": args.config, "notes": notes, "stages": derived}))
            return 0
        for note in notes:
            print(note)
        print(describe(cfg, stages))
        print(f"config OK: {args.config}")
        return 0
    if args.cmd == "run":
        from dist_train.control import REQUEUE_EXIT
        from dist_train.launch.driver import Preempted, RunFailed, run

        try:
            run(load_config(args.config, args.overrides), args.stage)
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            return REQUEUE_EXIT
        return 0
    if args.cmd == "data":
        return _data(args)
    if args.cmd == "export":
        return _export(args.checkpoint, args.output, args.adapter, args.dtype)
    if args.cmd == "predict":
        from dist_train.tasks.predict import predict_file

        _check_predict_args(args)
        fields = {f"{k}_field": getattr(args, f"{k}_field") for k in ("text", "text_pair", "label", "tokens", "tags",
                                                                       "prompt", "response")}
        n, metrics = predict_file(args.export_dir, args.input, args.output, args.batch_size, args.max_new_tokens,
                                  fields={k: v for k, v in fields.items() if v}, input_format=args.input_format)
        if args.output:
            print(f"wrote {n} predictions to {args.output}")
        if metrics:  # on stderr: stdout may be the predictions themselves
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "examples")
            print(f"metrics on the {n} records' gold labels: {shown}", file=sys.stderr)
        return 0
    if args.cmd == "eval":
        return _eval(args)
    if args.cmd == "ledger":
        return _ledger_verify(args.output_dir, args.stage, args.json)
    if args.cmd in ("report", "runs"):
        return _report(args)
    if args.cmd == "config-reference":
        from dist_train.config.reference import reference

        text = reference()
        if args.output:
            from dist_train.outputs import write_atomic

            out = Path(args.output)
            if out.is_dir():
                raise ConfigError(f"--output {args.output!r} is a directory: name a file to write")
            if not out.parent.is_dir():
                raise ConfigError(f"--output {args.output!r}: its directory does not exist: create it first")
            if out.exists() and not _starts_with(out, text.split("\n", 2)[0] + "\n\nGenerated from "):
                raise ConfigError(f"--output {args.output!r} exists and is not a configuration reference this "
                                  "command wrote: choose another file, or move it away")
            write_atomic(out, text)
            print(f"wrote {args.output}")
        else:
            print(text, end="")
        return 0
    raise AssertionError(args.cmd)


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dist_train.config.loader import ConfigError
    from dist_train.evaluate.harness import format_results, run_harness
    from dist_train.outputs import write_atomic

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks names no task: e.g. --tasks hellaswag,arc_easy")
    for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError("--num-fewshot must be 0 or more")
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output!r} is a directory: name a JSON file to write")
    if args.output:
        out = Path(args.output).resolve()
        if not out.parent.is_dir():
            raise ConfigError(f"--output {args.output!r}: its directory does not exist: create it first")
        if out.is_relative_to(Path(args.export_dir).resolve()):
            raise ConfigError(f"--output {args.output!r} is inside the model directory it scores: write it elsewhere")
        if out.is_file() and not _eval_output(out):
            raise ConfigError(f"--output {args.output!r} exists and is not an earlier `dist-train eval` result: "
                              "choose a new file name (only those are replaced)")
    results = run_harness(args.export_dir, tasks, include_path=args.include_path, limit=args.limit,
                          num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device)
    print(format_results(results))
    if args.output:
        write_atomic(Path(args.output), json.dumps({"model": str(args.export_dir), "results": results}, indent=1))
        print(f"wrote {args.output}")
    return 0


def _starts_with(path: Path, head: str) -> bool:
    """Whether the file at `path` begins with `head` (so replacing it loses nothing of the user's)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(len(head)) == head
    except OSError:
        return False


def _check_predict_args(args: argparse.Namespace) -> None:
    """Before the model loads: sizes that make sense, and an output that is neither the input nor in the model."""
    from dist_train.config.loader import ConfigError

    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if not Path(args.export_dir).is_dir():
        raise ConfigError(f"{args.export_dir!r} is not a directory: pass a fine-tune export "
                          "(<output_dir>/finetune/export)")
    if args.input != "-" and not Path(args.input).is_file():
        raise ConfigError(f"--input {args.input!r} is not a file: pass the records to predict (.jsonl/.csv/.parquet, "
                          ".txt, or - for stdin)")
    if args.output:
        out = Path(os.path.realpath(args.output))
        if args.input != "-" and out == Path(os.path.realpath(args.input)):
            raise ConfigError(f"--output {args.output!r} is the input file: write the predictions to another file")
        if Path(os.path.realpath(args.export_dir)) in out.parents:
            raise ConfigError(f"--output {args.output!r} is inside the model directory: write it elsewhere")
        if out.is_dir():
            raise ConfigError(f"--output {args.output!r} is a directory: name a file to write")
        if not out.parent.is_dir():
            raise ConfigError(f"--output {args.output!r}: its directory does not exist: create it first")
        if out.exists() and not args.overwrite:
            raise ConfigError(f"--output {args.output!r} exists: choose a new file, or pass --overwrite to replace it")


def _eval_output(path) -> bool:
    """Whether `path` holds what `dist-train eval --output` writes (so replacing it loses nothing of yours)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == {"model", "results"}


def _report(args: argparse.Namespace) -> int:
    from dist_train.config.loader import ConfigError
    from dist_train.report.data import NotARun

    try:
        if args.cmd == "report":
            from dist_train.report.page import write_report

            files = write_report(args.output_dir, ("md", "html") if args.html else ("md",))
            if args.json:
                from dist_train.report.data import load_run
                from dist_train.report.runs import run_summary

                print(dumps_strict(run_summary(load_run(Path(args.output_dir)))))
                return 0
            pages = [f for f in files if f.suffix != ".png"]
            print(f"wrote {', '.join(map(str, pages))} and {len(files) - len(pages)} plots in "
                  f"{files[-1].parent if len(files) > len(pages) else '-'}")
            return 0
        from dist_train.report.runs import list_runs, render

        rows = list_runs(args.root)
        print("\n".join(dumps_strict(r.typed()) for r in rows) if args.json else render(rows))
        return 0
    except NotARun as e:
        raise ConfigError(str(e)) from None


def _plan_job(cfg, stages: list[str], args: argparse.Namespace) -> int:
    from dist_train.config.loader import ConfigError
    from dist_train.config.sizing import Hardware, parse_memory, plan_stage, render

    if args.nodes < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
        raise ConfigError("--nodes and --gpus-per-node must be at least 1")
    hw = Hardware(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  gpu_memory=parse_memory(args.gpu_memory) if args.gpu_memory else None)
    plans = [plan_stage(cfg, stage, hw) for stage in stages]
    print("\n".join(render(p) for p in plans))
    print("plan only: nothing was started, and the data and model files were not checked (validate without "
          "--plan does that)")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_cmd == "tokenizer":
        from dist_train.data.tokenizer import build_tokenizer

        got = build_tokenizer(args.input, Path(args.output), args.vocab_size, args.kind, args.text_field,
                              args.overwrite)
        print(f"wrote a {args.kind} tokenizer of {int(got['vocab_size'])} tokens to {args.output} "
              f"({got['tokens_per_word']:.2f} tokens per word on the corpus, {int(got['documents'])} documents)")
        return 0
    if args.data_cmd == "build":
        from dist_train.data.build import build_shards

        man = build_shards(input_spec=args.input, output=args.output, tokenizer_name=args.tokenizer,
                           seq_len=args.seq_len, text_field=args.text_field,
                           samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                           seed=args.seed, overwrite=args.overwrite, workers=args.workers,
                           chunk_docs=args.chunk_docs, max_doc_mb=args.max_doc_mb)
        n = sum(s.samples for s in man.train)
        print(f"wrote {len(man.train)} train shards ({n} samples × {man.seq_len} tokens) and "
              f"{len(man.validation)} validation shards from {man.documents} documents to {args.output}")
        return 0
    from dist_train.data.manifest import read_manifest

    if args.data_cmd == "inspect" and args.samples < 1:
        from dist_train.config.loader import ConfigError

        raise ConfigError(f"--samples {args.samples} must be >= 1")
    man = read_manifest(args.data_dir)
    if args.data_cmd == "plan":
        return _plan(man, args)
    # inspect
    from dist_train.data.stream import read_shard
    from dist_train.model.build import load_tokenizer

    n = sum(s.samples for s in man.train)
    try:
        tok = load_tokenizer(man.tokenizer["name_or_path"])
    except ValueError:
        tok = None
    first = man.train[0]
    rows = read_shard(man.path(first), samples=first.samples, seq_len=man.seq_len, sha256=first.sha256)
    shown = [(i, arr.tolist(), tok.decode(arr.tolist()) if tok is not None else None)
             for i, arr in enumerate(rows[:args.samples])]
    if args.json:
        print(dumps_strict({"path": args.data_dir, "train_shards": len(man.train), "samples": n, "seq_len": man.seq_len,
                          "tokens": n * man.seq_len, "validation_shards": len(man.validation),
                          "documents": man.documents, "tokenizer": man.tokenizer["name_or_path"],
                          "vocab_size": man.vocab_size, "manifest_sha256": man.sha256,
                          "doc_tokens_histogram": man.doc_tokens_histogram,
                          "samples_shown": [{"shard": first.file, "index": i, "tokens": ids, "text": text}
                                            for i, ids, text in shown]}))
        return 0
    print(f"{args.data_dir}: {len(man.train)} train shards, {n} samples × {man.seq_len} tokens "
          f"({n * man.seq_len} tokens); {len(man.validation)} validation shards; tokenizer "
          f"{man.tokenizer['name_or_path']} ({man.vocab_size} tokens)")
    if man.doc_tokens_histogram:
        width = max(man.doc_tokens_histogram.values())
        print("documents by length in tokens:")
        for bucket, count in man.doc_tokens_histogram.items():
            print(f"  {bucket:>13} {count:>9}  {'#' * max(1, round(40 * count / width))}")
    for i, ids, text in shown:
        print(f"--- {first.file}:{i}\n{text if text is not None else ids[:32]}")
    return 0


def _plan(man, args: argparse.Namespace) -> int:
    from dist_train.config.loader import ConfigError
    from dist_train.data.manifest import DataError, read_manifest
    from dist_train.data.mixture import Mixture, counts, label, rank_step_ids
    from dist_train.data.plan import MAX_EPOCHS, first_step_of_epoch, reach_check, step_epoch

    for flag, value, least in (("--from-step", args.from_step, 0), ("--steps", args.steps, 1),
                               ("--epoch", args.epoch, 0), ("--window-shards", args.window_shards, 1),
                               ("--world-size", args.world_size, 1), ("--global-batch", args.global_batch, 1),
                               ("--lanes", args.lanes, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value} must be >= {least}")
    lanes = args.lanes or args.world_size
    if lanes % args.world_size or args.global_batch % lanes:
        raise ConfigError(f"--lanes {lanes} must be a multiple of --world-size {args.world_size} and divide "
                          f"--global-batch {args.global_batch}")
    mixed = [item.rpartition(":") for item in args.mix]
    if any(not sep for _, sep, _ in mixed):
        raise ConfigError("--mix takes DIR:WEIGHT, e.g. --mix general/:0.1")
    for item, (_, _, weight) in zip(args.mix, mixed, strict=True):
        try:
            ok = 0 < float(weight) < 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--mix {item!r}: the weight must be a number between 0 and 1, e.g. --mix general/:0.1")
    mans = [man, *(read_manifest(src) for src, _, _ in mixed)]
    mix = Mixture.build(mans, lanes=lanes, global_batch=args.global_batch, seed=args.seed,
                        window_shards=args.window_shards, mix_weights=tuple(float(w) for _, _, w in mixed))
    specs = mix.sources
    mix.check(args.world_size)
    files = [[s.file for s in m.train] for m in mans]
    if args.epoch is not None and args.epoch > MAX_EPOCHS:
        raise DataError(f"--epoch {args.epoch} lies beyond {MAX_EPOCHS:,} epochs of this data: no run gets there; "
                        "ask for an earlier step")
    first = args.from_step + (first_step_of_epoch(specs[0], args.epoch) if args.epoch is not None else 0)
    reached = counts(mix.weights, (first + args.steps) * mix.per_lane)
    for spec, position in zip(specs, reached, strict=True):  # refused here, not walked to
        reach_check(spec, position)
    for step in range(first, first + args.steps):
        for rank in range(args.world_size):
            ids = [label(files, *i) for i in rank_step_ids(mix, step, args.world_size, rank)]
            if args.json:
                print(json.dumps({"step": step, "epoch": step_epoch(specs[0], step), "rank": rank, "samples": ids}))
            else:
                print(f"step {step} rank {rank}: {' '.join(ids)}")
    return 0


def _export(checkpoint: str, output: str, adapter_only: bool = False, dtype: str | None = None) -> int:
    from pathlib import Path

    from dist_train.checkpoint.export import export_checkpoint
    from dist_train.checkpoint.manager import latest_committed, verify_files
    from dist_train.config.loader import ConfigError

    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():  # a stage directory
        path = path / "checkpoints"
    if (path / "latest").is_file():  # a checkpoints directory: its latest committed checkpoint
        tag = latest_committed(path)
        if tag is None:
            raise ConfigError(f"{path} holds no committed checkpoint")
        path = path / tag
    if not (path / "meta.json").is_file():
        raise ConfigError(f"{checkpoint} is not a committed checkpoint (no meta.json): point at "
                          "<output_dir>/<stage>/checkpoints/step_N")
    problem = verify_files(path)
    if problem is not None:
        raise ConfigError(f"{path} is damaged ({problem}): export an earlier checkpoint")
    if dtype is None:  # the stage's own setting, as the run's export used
        meta = json.loads((path / "meta.json").read_text())
        section = (meta.get("config") or {}).get(meta.get("stage")) if isinstance(meta, dict) else None
        dtype = ((section or {}).get("train") or {}).get("export_dtype")
        dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "auto"
    try:
        export_checkpoint(path, Path(output), adapter_only=adapter_only, dtype=dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {path} to {output}")
    return 0


def _ledger_verify(output_dir: str, stage: str, as_json: bool = False) -> int:
    from pathlib import Path

    from dist_train.checkpoint.manager import latest_committed, verify_files
    from dist_train.data.ledger import verify
    from dist_train.data.manifest import DataError, read_manifest
    from dist_train.data.mixture import Mixture
    from dist_train.data.sources import PIPE

    stage_dir = Path(output_dir) / stage
    root = stage_dir / "checkpoints"
    tag = latest_committed(root) if root.is_dir() else None
    if tag is None:
        raise DataError(f"{stage_dir} holds no committed checkpoint: nothing to verify (is it a run's output_dir?)")
    problem = verify_files(root / tag)  # before anything it lists is believed
    if problem is not None:
        raise DataError(f"checkpoint {tag} of {stage_dir} is damaged ({problem}): its data plan cannot be trusted")
    try:
        plan = json.loads((root / tag / "meta.json").read_text())["plan"]
        sources = [str(plan["shards"]), *(str(m["shards"]) for m in plan["mix"])]
    except (KeyError, TypeError) as e:
        raise DataError(f"checkpoint {tag} of {stage_dir} has no readable data plan ({e!r}): it was not written "
                        "by a pretraining stage of dist-train") from None
    for src in sources:
        if src.startswith(PIPE):  # a command read from a file is never run
            raise DataError(f"the run's data plan reads shards through a command ({src[:60]!r}); ledger verify "
                            "never runs a command read from a run's files: it verifies runs on directories or URLs")
    mans = [read_manifest(src) for src in sources]
    mix = Mixture.build(mans, lanes=plan["lanes"], global_batch=plan["global_batch"], seed=plan["seed"],
                        window_shards=plan["window_shards"], mix_weights=tuple(m["weight"] for m in plan["mix"]))
    v = verify(stage_dir, mix, [[s.file for s in man.train] for man in mans])
    if as_json:
        from dataclasses import asdict

        print(dumps_strict({"stage": stage, "checkpoint": tag, **asdict(v), "ok": v.ok}))
        return 0 if v.ok else 1
    print(f"{stage}: {v.steps} steps, {v.samples} samples, {v.complete_epochs} complete epochs, world sizes "
          f"{v.world_sizes}; duplicated {v.duplicated}, missing {v.missing}, off-plan steps {v.off_plan_steps}, "
          f"re-run steps {v.rerun_steps}")
    for problem in v.problems[:20]:
        print(f"problem: {problem}")
    print("ledger OK" if v.ok else "ledger FAILED")
    return 0 if v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
