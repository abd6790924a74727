"""`psat submit` against a real Ray head started here (`ray start --head` on 127.0.0.1)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1, stopped (by its pid) after the test."""
    port, dashboard = _free_port(), _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=6", "--include-dashboard=true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the head's python
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(address, timeout=2)
            break
        except OSError as err:
            if getattr(err, "code", None):  # an HTTP answer (e.g. 401): the dashboard is up
                break
            time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


@pytest.mark.slow
def test_submitted_training_job_succeeds_and_is_in_mlflow(ray_head, tmp_path):
    db = tmp_path / "mlflow.db"
    sets = {
        "name": "submitted",
        "storage.path": str(tmp_path / "runs"),
        "training.epochs": "1",
        "data.train_size": "128",
        "data.val_size": "32",
        "model.embedding_dim": "4",
        **{f"attacks.train.{n}.steps": "1" for n in ("linf", "l2", "l1")},
        **{f"attacks.eval.{n}.steps": "1" for n in ("linf", "l2", "l1")},
    }
    command = [str(BIN / "psat"), "submit", "train", "--config", "jobs/configs/quickstart.yaml",
               "--address", ray_head]  # fmt: skip
    command += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted raysubmit_" in proc.stdout and "SUCCEEDED" in proc.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("psat-quickstart").experiment_id
    (run,) = client.search_runs(
        [experiment], "tags.`psat.job` = 'submitted' and tags.`psat.role` = 'train'"
    )
    assert run.info.status == "FINISHED"
    members = client.search_runs([experiment], "tags.`psat.role` = 'member'")
    assert {m.data.tags["psat.norm"] for m in members} == {"linf", "l2", "l1"}


@pytest.mark.slow
def test_unreachable_address_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [str(BIN / "psat"), "submit", "train", "--config", "jobs/configs/quickstart.yaml",
         "--address", f"http://127.0.0.1:{_free_port()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach the Ray cluster" in proc.stderr
    assert list(tmp_path.iterdir()) == []
