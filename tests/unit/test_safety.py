"""Safe by default: checkpoints never run pickle code, and a local Ray is loopback-only with token auth."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_train.checkpoint.safe_load import deepspeed_globals, weights_only_loading
from tests.conftest import REPO


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code_even_through_deepspeed(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": Payload(marker)}, path)
    with weights_only_loading(), pytest.raises(Exception, match="Weights only load failed"):
        TorchCheckpointEngine().load(str(path))  # DeepSpeed itself asks for weights_only=False
    assert not marker.exists()


def test_what_deepspeed_checkpoints_hold_still_loads(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim.pt"
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": scaler,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "w": torch.arange(4.0)}
    torch.save(state, path)
    with weights_only_loading():
        back = torch.load(path, weights_only=False)
    assert back["zero_stage"] == ZeroStageEnum.gradients and torch.equal(back["w"], state["w"])
    assert len(deepspeed_globals()) == 4  # the whole allow-list: nothing else is trusted


PROBE = """
import json, urllib.error, urllib.request, psutil, ray
from dist_train.config.loader import load_config
from dist_train.launch.driver import start_ray
start_ray(load_config("configs/quickstart.yaml", []))
url = ray._private.worker.global_worker.node.address_info["webui_url"]
port = int(url.rsplit(":", 1)[1])
hosts = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
try:
    status = urllib.request.urlopen(f"http://{url}/api/jobs/", timeout=10).status
except urllib.error.HTTPError as e:
    status = e.code
print(json.dumps({"url": url, "hosts": hosts, "status": status}))
ray.shutdown()
"""


@pytest.mark.integration
def test_local_ray_dashboard_is_loopback_only_and_needs_the_token():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    assert probe["url"].startswith("127.0.0.1:") and probe["hosts"] == ["127.0.0.1"], probe
    assert probe["status"] == 401, "the jobs API must refuse a request without the token"


def test_train_state_in_checkpoints_loads_weights_only(tmp_path):
    """Metrics arrive as numpy scalars; the client state must still load with weights_only=True."""
    import numpy as np

    from dist_train.train.loop import TrainState

    state = TrainState(step=6, best=np.float64(0.25), last_eval={"accuracy": np.float64(0.25),
                                                                 "per_class": {"a": {"f1": np.float32(0.5)}}})
    torch.save({"train_state": state.state_dict()}, tmp_path / "s.pt")
    back = TrainState()
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["train_state"])
    assert back.best == 0.25 and back.last_eval["per_class"]["a"]["f1"] == 0.5 and back.step == 6


def test_deepspeed_loads_without_mlflow_and_mlflow_stays_importable():
    """DeepSpeed's autotuner imports MLflow at package import (1.2 s a worker); dist_train hides it, only then."""
    import subprocess
    import sys

    code = ("import sys; from dist_train.deepspeed_import import import_deepspeed; ds = import_deepspeed(); "
            "assert 'mlflow' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m); "
            "from deepspeed.autotuning import autotuner; assert not autotuner.has_mlflow; "
            "import mlflow; assert mlflow.__version__; assert import_deepspeed() is ds; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_deepspeed_starts_without_compiling_its_inference_only_shm_op(tmp_path):
    """Training never calls inference_all_reduce, the only user of DeepSpeed's shared-memory op, so its
    77 s C++ build on a fresh machine is skipped; DeepSpeed still has the function this replaces."""
    import subprocess
    import sys

    code = ("import os, sys, deepspeed.comm.torch; t = sys.modules['deepspeed.comm.torch']; "
            "assert callable(t.build_shm_op), 'DeepSpeed changed'; "
            "from dist_train.deepspeed_import import import_deepspeed; ds = import_deepspeed(); "
            "ds.init_distributed(dist_backend='gloo', verbose=False); c = sys.modules['deepspeed.comm.comm']; "
            "assert c.cdb.shm_comm_op is None; x = __import__('torch').ones(3); c.inference_all_reduce(x); "
            "assert not os.listdir(os.environ['TORCH_EXTENSIONS_DIR']); print('ok')")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-1000:] + res.stderr[-2000:]
