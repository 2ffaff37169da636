"""A corrupt shard on one of two Ray workers: `error` stops the run naming it, `skip` finishes;
neither hangs."""

import json
import shutil

import pytest

from dist_train.data.manifest import read_manifest
from dist_train.data.plan import PlanSpec, epoch_lanes
from dist_train.data.quickstart import prepare_python_docs
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("bad")
    prepare_python_docs(cwd / "data" / "quickstart", seq_len=128, vocab_size=4096, progress=False)
    bad = cwd / "bad_shards"
    shutil.copytree(cwd / "data" / "quickstart" / "shards", bad)
    man = read_manifest(bad)
    spec = PlanSpec(tuple(s.samples for s in man.train), lanes=2, global_batch=16, seed=0)
    victim = man.train[epoch_lanes(spec, 0)[1][0]].file  # the first shard rank 1 reads
    data = (bad / victim).read_bytes()
    (bad / victim).write_bytes(data[: len(data) // 3])
    return cwd, bad, victim


def run(cwd, shards, policy):
    return run_cli("run", str(REPO / "configs" / "quickstart.yaml"), f"output_dir=run-{policy}", "finetune=null",
                  f"pretrain.data.shards={shards}", f"pretrain.data.on_bad_sample={policy}",
                  "pretrain.train.max_steps=6", "pretrain.train.eval_every=0", cwd=cwd, timeout=600)


def test_error_policy_stops_naming_the_shard(corrupt):
    cwd, bad, victim = corrupt
    res = run(cwd, bad, "error")  # run's timeout is the bound on hanging; two attempts took 382 s on a busy CI
    assert res.returncode == 1
    ours = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: stage pretrain failed"), res.stderr[-2000:]
    assert victim in ours[0] and "unreadable" in ours[0]
    # restarts are on by default, but the same error at the same step is not retried a third time
    assert ours[0].endswith("(attempt 2 failed the same way at the same step as attempt 1, so it was not "
                            "restarted again)"), ours[0]
    assert "[pretrain] attempt 1 failed at step " in res.stdout and "restarting from the last committed" in res.stdout


def test_skip_policy_finishes_with_every_rank_in_step(corrupt):
    cwd, bad, victim = corrupt
    res = run(cwd, bad, "skip")
    assert res.returncode == 0, res.stderr[-2000:]
    stage = json.loads((cwd / "run-skip" / "report.json").read_text())["stages"]["pretrain"]
    assert stage["steps"] == 6 and stage["replaced_samples"] > 0
    assert f"[data] {victim}: unreadable" in res.stdout


def test_mixture_run_follows_its_shares_and_verifies(corrupt):
    cwd, _, _ = corrupt
    shards = cwd / "data" / "quickstart" / "shards"
    res = run_cli("run", str(REPO / "configs" / "quickstart.yaml"), "output_dir=run-mix", "finetune=null",
                  f"pretrain.data.mix=[{{shards: '{shards}/shard-{{000000..000002}}.tar', weight: 0.25}}]",
                  "pretrain.train.max_steps=8", "pretrain.train.save_every=4", "pretrain.train.eval_every=0",
                  cwd=cwd, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("ledger", "verify", str(cwd / "run-mix"), cwd=cwd)
    assert res.returncode == 0 and "8 steps, 128 samples" in res.stdout, res.stdout + res.stderr
    records = [json.loads(p.read_text()) for p in (cwd / "run-mix" / "pretrain" / "ledger").glob("*.json")]
    mixed = sum(n for r in records for ranges in r["steps"].values() for f, _, n in ranges if f.startswith("mix1/"))
    assert mixed == 32  # exactly a quarter of 128
