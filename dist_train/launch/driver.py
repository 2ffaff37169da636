"""The Ray driver: validate, prepare data, then one Ray Train `TorchTrainer` per stage.

Nothing touches the cluster or output_dir until every check has passed. Each stage is a
separate `fit()`, so a fine-tune can start from the pretrain export and a single stage can be
rerun alone. The report merges the stages' results with the resolved config and timings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_train.config.checks import check_run, resolve
from dist_train.config.derived import describe
from dist_train.config.loader import ConfigError, to_dict
from dist_train.config.schema import STAGES, RunConfig, headline
from dist_train.control import REQUEUE_EXIT, preemption_requested, request_preemption
from dist_train.control import clear as clear_requests
from dist_train.launch.lock import hold
from dist_train.launch.recovery import attempt_end, stop_reason
from dist_train.launch.status import run_status
from dist_train.launch.trackers import tracking
from dist_train.outputs import REPORT, RESULT, write_atomic
from dist_train.progress import DRIVER_TTY_ENV, EVERY_S_ENV
from dist_train.ray_internals import AUTH_NOTICE_LOGGER
from dist_train.train.heartbeat import read_incidents


class RunFailed(RuntimeError):
    """A stage failed on the cluster; the message names the stage and the worker's error."""


class Preempted(RuntimeError):
    """The run stopped on request (SIGTERM) after committing a checkpoint; rerunning resumes it."""


@contextlib.contextmanager
def preemption_signal(cfg: RunConfig, log=print) -> Iterator[None]:
    """While the block runs, SIGTERM asks the workers to checkpoint at the next step and stop.

    Slurm (before its kill), spot-instance notices and `ray job stop` all send SIGTERM. If the
    workers have not stopped within ray.preemption_grace_s, the driver exits anyway with
    REQUEUE_EXIT: the last committed checkpoint stays valid, whatever was in flight is discarded.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def give_up() -> None:
        log(f"preemption: the workers did not stop within {cfg.ray.preemption_grace_s:.0f} s; exiting "
            "(the last committed checkpoint is intact)")
        os._exit(REQUEUE_EXIT)

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        request_preemption(cfg.output_dir, name)
        log(f"{name}: checkpointing at the next step boundary, then exiting with {REQUEUE_EXIT} "
            f"(grace {cfg.ray.preemption_grace_s:.0f} s)")
        timer = threading.Timer(cfg.ray.preemption_grace_s, give_up)
        timer.daemon = True
        timer.start()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_job_paths(cfg: RunConfig, cwd: str | None = None) -> None:
    """Refuse relative output paths when the driver runs in a Ray job's working directory.

    `ray job submit --working-dir` runs the entrypoint in a temporary copy that Ray may unpack
    again or delete, on one node only: a run or its prepared data written there is lost, and
    workers on other nodes never see it.
    """
    cwd = cwd or os.getcwd()
    if "/runtime_resources/working_dir_files/" not in cwd + "/":
        return
    paths = {"output_dir": cfg.output_dir, "prepare.dir": cfg.prepare.dir if cfg.prepare else None}
    for key, path in paths.items():
        if path and not os.path.isabs(os.path.expanduser(path)) and "://" not in path:
            raise ConfigError(f"{key}={path!r} is relative, and this driver runs in a Ray job's temporary working "
                              f"directory: pass {key}=/an/absolute/path on storage every node shares")


def stages_to_run(cfg: RunConfig, only: str | None) -> list[str]:
    return [only] if only else [s for s in STAGES if getattr(cfg, s) is not None]


def prepare(cfg: RunConfig) -> None:
    if cfg.prepare is not None:
        from dist_train.data.quickstart import prepare_python_docs

        p = cfg.prepare
        prepare_python_docs(p.dir, seq_len=p.seq_len, vocab_size=p.vocab_size, seed=cfg.seed, tokenizer=p.tokenizer)


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1",
           # Ray Train's print patch would echo every line of rank 0 twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", EVERY_S_ENV: str(cfg.logging.console_every_s),
           # live bars drawn by the driver when it has a terminal; tqdm_ray must not patch print()
           DRIVER_TTY_ENV: "1" if sys.stderr.isatty() else "0", "RAY_TQDM_PATCH_PRINT": "0"}
    if not cfg.ray.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator, with the gloo backend
    return env


def quiet_ray_console() -> None:
    """What Ray prints in this process reads well in a Slurm .out file (set before Ray is imported;
    each stays as the user set it). Ray's own logs keep everything, in its session directory."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI codes in a file
    # Our workers' lines carry their stage and, where it matters, their rank: "(RayTrainWorker pid=…)" adds nothing.
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    # Ray's node-drain watcher: dist-train handles preemption by SIGTERM, and its shutdown prints a
    # core_worker error line at the end of every successful stage. Ray Train passes this to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def start_ray(cfg: RunConfig, log=print) -> None:
    quiet_ray_console()
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # When a worker fails, Ray Train waits this long for the others to leave the process group
    # before restarting. A frozen or collective-blocked rank never leaves: 30 s (Ray's default) of
    # every recovery was spent waiting for it. A healthy group leaves in well under a second.
    os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "10")
    # Ray Train's controller polls its workers this often (Ray's default 2 s): an attempt's end, or a failed
    # rank, is seen 1 s later on average. The poll is a small remote call; a missed one costs nothing.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        return
    # `ray job submit` runs the entrypoint with RAY_ADDRESS set: join that cluster.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        from dist_train.launch.cluster import check_capacity

        t = time.time()
        info = ray.init(address=address, log_to_driver=True)
        check_capacity(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, address)
        log(f"[setup] joined the Ray cluster at {address} in {time.time() - t:.1f} s"
            + (f" (dashboard http://{info.dashboard_url}" if getattr(info, "dashboard_url", None) else " (")
            + f"; Ray's logs, Ray Train's included, in {session_logs(info)} on the head node)")
        return
    # A local instance binds to this machine; Ray's notice that it uses token auth tells the user nothing.
    logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    # A local instance: reserve enough logical CPUs for the workers even on a small machine
    # (they are threads-limited by cpus_per_worker anyway).
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    # A private instance, whatever else runs on this machine: address="local" never joins the cluster
    # that /tmp/ray/ray_current_cluster names (a colleague's `ray start`, or a stale file of a stopped
    # one). Ray Train's placement-group cleaner finds the state API through RAY_API_SERVER_ADDRESS,
    # which the instance's processes inherit from here; without it they would look for "the" local
    # cluster and might query another one. The dashboard listens on loopback only.
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    t = time.time()
    info = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=True,
                    dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True, configure_logging=True,
                    logging_level="WARNING")
    log(f"[setup] started a private Ray instance in {time.time() - t:.1f} s (dashboard http://127.0.0.1:{port}; "
        f"its logs, Ray Train's included, in {session_logs(info)})")


def session_logs(info: Any) -> str:
    """The log directory of the Ray session `ray.init` returned (its address_info names the session)."""
    session = (getattr(info, "address_info", None) or {}).get("session_dir")
    return str(Path(session) / "logs") if session else "the Ray session's logs directory"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_stage(cfg: RunConfig, stage: str, log=print, label: str | None = None) -> dict[str, Any]:
    """Train one stage to its end; returns its result. A failed attempt is restarted from the last
    committed checkpoint up to ray.max_failures times, unless it repeats the attempt before it
    (launch/recovery.py). The result lists how each attempt ended when there was more than one.
    `label` names the stage on the console (compare_base's fine-tune of the base model)."""
    stage_dir = Path(cfg.output_dir) / stage
    ends = []
    while True:
        attempt = time.time()  # this start's id, handed to every rank and recorded with what they report
        log(f"[{label or stage}] starting {cfg.ray.num_workers} workers"
            + (f" (attempt {len(ends) + 1})" if ends else ""))
        try:
            make_trainer(cfg, stage, attempt).fit()
            break
        except Exception as e:  # Ray wraps the worker's exception
            ends.append(end := attempt_end(stage_dir, len(ends) + 1, attempt, e))
            where = f" at step {end.step}" if end.step is not None else ""
            if preemption_requested(cfg.output_dir):  # a stop was asked for: resume later, do not restart now
                raise Preempted(f"stage {stage}: attempt {end.number} failed{where} ({end.cause}) while a stop "
                                "was requested; rerun the same command to resume from the last committed "
                                f"checkpoint (exit status {REQUEUE_EXIT} asks a Slurm script to requeue)") from e
            stop = stop_reason(ends, cfg.ray.max_failures)
            if stop is not None:
                if end.signature is not None and any(i.get("kind") == "error" for i in read_incidents(stage_dir)):
                    log(f"[{label or stage}] each failed rank's traceback: {stage_dir / 'tracebacks'}")
                raise RunFailed(f"stage {stage} failed{where}: {end.cause}" + (f" ({stop})" if stop else "")) from e
            left = "unlimited" if cfg.ray.max_failures == -1 else cfg.ray.max_failures - len(ends)
            log(f"[{label or stage}] {end.line()}; restarting from the last committed checkpoint "
                f"(restarts left after this one: {left})")
    result = json.loads((stage_dir / RESULT).read_text())
    if result.get("preempted"):
        raise Preempted(f"stage {stage} stopped at step {result['steps']} on request; checkpoint "
                        f"{result['checkpoint']} is committed. Rerun the same command to resume (exit status "
                        f"{REQUEUE_EXIT} asks a Slurm script to requeue)")
    if ends:
        result["attempts_ended"] = [e.line() for e in ends] + [f"attempt {len(ends) + 1} completed"]
        write_atomic(stage_dir / RESULT, json.dumps(result, indent=1))
        log(f"[{label or stage}] {len(ends) + 1} attempts: " + "; ".join(result["attempts_ended"]))
    return result


def make_trainer(cfg: RunConfig, stage: str, attempt: float) -> Any:
    """One attempt at a stage: a Ray Train trainer whose own restarts are off (fit_stage decides)."""
    from ray.train import FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from dist_train.launch.torch_backend import ClusterTorchConfig
    from dist_train.launch.worker import train_worker

    return TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "stage": stage, "attempt": attempt},
        torch_config=ClusterTorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo",
                                        timeout_s=cfg.ray.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RayRunConfig(name=stage, storage_path=str(Path(cfg.output_dir) / "_ray"),
                                failure_config=FailureConfig(max_failures=0),
                                # Ray Train's own progress and its copy of a worker's traceback stay in its
                                # log files: the driver prints one line per failure, and the traceback is in
                                # <stage>/incidents.jsonl
                                logging_config=LoggingConfig(log_level="CRITICAL"),
                                worker_runtime_env={"env_vars": worker_env(cfg)}),
    )


def run(cfg: RunConfig, only_stage: str | None = None, log=print) -> dict[str, Any]:
    """Validate, prepare, train every selected stage, write report.json; returns the report.
    Raises Preempted when SIGTERM stopped it (after a checkpoint), RunFailed when a stage failed."""
    t0 = time.time()
    check_job_paths(cfg)
    chosen: list[str] = []  # what each stage's precision `auto` became, said with the checks' notes
    cfg = resolve(cfg, chosen)
    stages = stages_to_run(cfg, only_stage)
    with hold(Path(cfg.output_dir), log):  # one run per output_dir, before anything is built or started
        return _run_locked(cfg, stages, t0, log, [n for n in chosen if n.split("]")[0][1:] in stages])


def _run_locked(cfg: RunConfig, stages: list[str], t0: float, log, chosen: list[str]) -> dict[str, Any]:
    if cfg.prepare is not None:  # fail before spending time on building the data
        check_run(cfg, stages)
    prepare(cfg)
    cfg = resolve(cfg)  # paths into the prepared data exist now and become absolute
    for note in chosen + check_run(cfg, stages):
        log(note)
    log(describe(cfg, stages))
    timings: dict[str, float] = {"prepare_and_check_s": time.time() - t0}
    t = time.time()
    start_ray(cfg, log)  # a cluster too small for the workers leaves nothing behind (hold removes the directory)
    timings["ray_init_s"] = time.time() - t
    out = Path(cfg.output_dir)
    clear_requests(out)  # a stop request of an earlier, preempted run is not for this one
    report_path = out / REPORT
    previous = json.loads(report_path.read_text()) if report_path.is_file() else {}
    results: dict[str, Any] = dict(previous.get("stages", {}))
    max_steps = {stage: getattr(cfg, stage).train.max_steps for stage in stages}
    # after ray.init, which installs SIGTERM handlers of its own
    with run_status(out, stages, max_steps) as status, tracking(cfg.logging, out, to_dict(cfg), log) as trackers, \
            preemption_signal(cfg, log):
        for stage in stages:
            if preemption_requested(cfg.output_dir):
                raise Preempted(f"stopped on request before stage {stage}; rerun the same command to continue "
                                f"(exit status {REQUEUE_EXIT} asks a Slurm script to requeue)")
            t = time.time()
            status.write(stage=stage)
            if stage == "pretrain":
                pack_eval_sets(cfg)
            write_deepspeed_json(cfg, stage, log)
            with trackers.follow(stage) if trackers else contextlib.nullcontext():
                result = fit_stage(cfg, stage, log)
            timings[f"{stage}_s"] = time.time() - t
            results[stage] = result
            log(f"[{stage}] done: {summary_line(result)}")
            if stage == "pretrain" and "adaptation" in result:
                log(f"[pretrain] adaptation: {result['adaptation']['summary']}")
            if stage == "pretrain" and cfg.pretrain.eval.lm_eval.tasks:
                from dist_train.launch.compare import benchmarks

                results[stage] = result = {**result, "lm_eval": benchmarks(cfg, result["export_dir"],
                                                                            worker_env(cfg), log)}
                write_atomic(Path(cfg.output_dir) / stage / RESULT, json.dumps(result, indent=1))
            if stage == "finetune" and cfg.finetune.compare_base:
                t = time.time()
                results[stage] = result = compare_with_base(cfg, result, log)
                timings["compare_base_s"] = time.time() - t
        timings["total_s"] = time.time() - t0
        report = {"config": to_dict(cfg), "stages": results, "timings": timings}
        write_atomic(report_path, json.dumps(report, indent=1))
        if trackers:
            trackers.summary(report, report_path)
    log(f"report: {report_path} (plots: dist-train report {cfg.output_dir})")
    return report


def write_deepspeed_json(cfg: RunConfig, stage: str, log=print) -> None:
    """OUTPUT_DIR/<stage>/deepspeed.json: the merged DeepSpeed config the stage's engines get (for the
    planned worker count), named once on the console."""
    from dist_train.config.derived import derive_stage

    path = Path(cfg.output_dir) / stage / "deepspeed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(derive_stage(cfg, stage).deepspeed, indent=1))
    log(f"[{stage}] DeepSpeed config: {path}")


def pack_eval_sets(cfg: RunConfig) -> None:
    """Pack the text corpora named in pretrain.eval.sets with the stage's tokenizer (once)."""
    from dist_train.data.evalsets import eval_sources, pack_corpus

    for s in eval_sources(cfg):
        if s.is_corpus:
            pack_corpus(s, cfg.output_dir, cfg.model.tokenizer or cfg.model.name_or_path, cfg.pretrain.data.seq_len)


def compare_with_base(cfg: RunConfig, result: dict[str, Any], log=print) -> dict[str, Any]:
    """Fine-tune the unadapted model too (OUTPUT_DIR/compare_base/), compare the two on the test set,
    and return the fine-tune's result with `compare_base` (also written to its result.json)."""
    from dist_train.launch.compare import base_config, compare

    base_cfg = base_config(cfg)
    base = cfg.model.name_or_path or "model.arch, freshly initialised"
    log(f"[finetune] compare_base: fine-tuning the unadapted model ({base}) with the same settings in "
        f"{base_cfg.output_dir}")
    base = fit_stage(base_cfg, "finetune", log, label="finetune compare_base")
    comparison = compare(cfg, base_cfg)
    comparison.update(base_export_dir=base["export_dir"], base_test=base.get("test"), base_steps=base["steps"])
    result = {**result, "compare_base": comparison}
    write_atomic(Path(cfg.output_dir) / "finetune" / RESULT, json.dumps(result, indent=1))
    log(f"[finetune] {comparison['summary']}")
    return result


def summary_line(result: dict[str, Any]) -> str:
    ev = result.get("eval") or {}
    parts = [f"steps={result['steps']}", f"loss={result['final_train_loss']:.4f}",
             f"tokens/s={result['tokens_per_s']:.0f}", f"mfu={result['mfu']:.1%}"]
    parts += [f"eval_{k}={v:.4g}" for k, v in headline(ev).items()]
    parts += [f"test_{k}={v:.4g}" for k, v in headline(result.get("test") or {}).items()]
    return " ".join(parts) + f" export={result['export_dir']}"
