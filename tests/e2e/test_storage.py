"""Jobs whose storage is object storage: `storage.path: s3://bucket/psat` on a real S3-API
server (moto's, on 127.0.0.1), the endpoint given as pyarrow and Ray read it
(AWS_ENDPOINT_URL). Each job is a `psat` process with a local Ray of its own, whose workers
inherit that environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from helpers import ENV, S3Server
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

JOB = {
    "data": {"dataset": "digits", "train_size": 192, "val_size": 16, "eval_size": 8},
    "model": {"arch": "resnet10", "embedding_dim": 4},
    "training": {"epochs": 7, "batch_size": 64, "amp": False, "members": ["linf"]},
    "attacks": {
        "train": {n: {"steps": 2} for n in ("linf", "l2", "l1")},
        "validation": {n: {"steps": 1} for n in ("linf", "l2", "l1")},
        "eval": {n: {"steps": 1, "restarts": 1} for n in ("linf", "l2", "l1")},
    },
    "evaluation": {"suite": "paper", "concurrent_chunks": 2},
    "storage": {"path": "s3://psat-bucket/runs"},
    "resources": {"max_failures": 0},  # a failure ends the job at once
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(Path(sys.executable).parent, tmp_path_factory.mktemp("s3")).start()
    server.create_bucket("psat-bucket")
    yield server
    server.stop()


def launch(tmp_path: Path, s3: S3Server, name: str, command: str = "train") -> subprocess.Popen:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"name": name, **JOB}))
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", command, "--config", str(config)],
        cwd=tmp_path, env=ENV | s3.env | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def until(proc: subprocess.Popen, text: str) -> list[str]:
    """Read `proc`'s progress lines until one holds `text`."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} in: {''.join(lines)}{proc.stderr.read()[-3000:]}")


@pytest.mark.usefixtures("tracking_store")
def test_a_job_on_s3_resumes_after_a_crash_and_registers(tmp_path, s3):
    first = launch(tmp_path, s3, "s3job")
    until(first, "epoch 1/7")  # its progress lags up to 2 s: 7 epochs leave the crash room
    os.killpg(first.pid, signal.SIGKILL)  # the machine goes: the job and its local Ray
    first.wait()
    fs = s3.filesystem()
    data = fs.get_file_info(pafs.FileSelector("psat-bucket/runs/s3job/data"))
    assert {Path(f.path).name for f in data} >= {"manifest.json", "val.parquet", "eval.parquet"}

    second = launch(tmp_path, s3, "s3job", "run")  # the same name: resume, then aggregate
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:] + err[-3000:]
    resumed = [line for line in out.splitlines() if "started resuming at epoch" in line]
    assert resumed and not any("started from scratch" in line for line in out.splitlines()), out
    assert "registered models:/psat-ensemble/1" in out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    models = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`psat.role` = 'model'"
    )
    assert len(models) == 1  # one run per member: the relaunch kept it
    for run in models:
        checkpoint = run.data.tags["psat.checkpoint"]
        assert checkpoint.startswith("s3://psat-bucket/runs/s3job/")
        assert fs.get_file_info(checkpoint.removeprefix("s3://") + "/state.pt").size > 0


@pytest.mark.usefixtures("tracking_store")
def test_an_s3_server_gone_mid_job_ends_it_in_one_line(tmp_path, s3):
    proc = launch(tmp_path, s3, "s3gone")
    until(proc, "started from scratch")  # training, its first checkpoint on the way
    s3.stop()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-3000:]
    (line,) = err.strip().splitlines()[-1:]
    assert line.startswith("psat train: error: ") and "storage s3://psat-bucket/runs failed" in line
    assert "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
