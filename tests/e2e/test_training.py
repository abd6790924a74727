"""The training job on a real local Ray and a real MLflow SQLite store (tiny data, few steps)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, ray_actors
from mlflow.tracking import MlflowClient

from orchestrator.config import deep_merge, parse_config
from orchestrator.runtime.ray_session import board_name
from orchestrator.train_members import train_members
from psat_core.checkpoint import load_state

pytestmark = pytest.mark.slow


def _member_runs(job):
    client = MlflowClient(job.tracking.uri)
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`psat.job` = '{job.name}' and tags.`psat.role` = 'model'",
    )
    return client, {r.data.tags["psat.plan"]: r for r in runs}


# enough work per epoch (seconds, not milliseconds) that members overlap and kills land mid-run
PACED = {
    "data": {"train_size": 256, "val_size": 64},
    "training": {"batch_size": 32},
    "attacks": {
        "train": {n: {"steps": 3} for n in ("linf", "l2", "l1")},
        "eval": {n: {"steps": 5} for n in ("linf", "l2", "l1")},
    },
}


def _kill_after_epoch(ray, job, norm: str, epoch: int, seen: dict) -> None:
    """Wait for `norm`'s report of `epoch`, then SIGKILL its training worker process."""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            board = ray.get_actor(board_name(job))
            events = ray.get(board.since.remote(0))
        except ValueError:
            events = []
        mine = [e for e in events if e["model"] == norm]
        pids = [e["pid"] for e in mine if e["kind"] == "start"]
        if any(e["kind"] == "epoch" and e["epoch"] >= epoch for e in mine):
            seen["pid"] = pids[-1]
            os.kill(pids[-1], signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.mark.usefixtures("tracking_store")
def test_members_train_concurrently_and_an_interrupted_job_resumes(shared_ray, tiny_job):
    """One job: the three members train at once, tracked; l2's worker dies (no retries left),
    the job fails; a damaged checkpoint is then one error; relaunched under the same name, l2
    resumes from its checkpoint in the same run and the finished members are not trained
    again (no trainer starts for them)."""
    paced = deep_merge(PACED, {"training": {"epochs": 3}})
    job = parse_config(tiny_job("interrupted", **paced, resources={"max_failures": 0}))
    before = ray_actors(shared_ray)
    seen = {}
    # after epoch 1's report: epoch 0's checkpoint is persisted by then (Ray may lag one report)
    killer = threading.Thread(target=_kill_after_epoch, args=(shared_ray, job, "l2", 1, seen))
    killer.start()
    with pytest.raises(Exception, match="(?i)fail|died|error"):
        train_members(job, echo=lambda line: None)  # on the Ray this process started
    killer.join()
    # one Ray Train controller per member; one machine runs no preemption watchers, and
    # workers that read their own shards no Ray Data actor, the driver's runs no placement
    # group cleaner (`trainers.ShardTrainer`)
    actors = [a for key, a in ray_actors(shared_ray).items() if key not in before]
    assert sum(a.class_name == "TrainController" for a in actors) == 3
    unneeded = ("PreemptionWatcher", "DatasetManager", "PlacementGroupCleaner")
    assert not [a for a in actors if a.class_name in unneeded]
    client, runs = _member_runs(job)
    assert runs["l2"].info.status == "FAILED"
    intervals, finished = {}, {}
    for norm in ("linf", "l1"):
        run = runs[norm]
        assert run.info.status == "FINISHED"
        checkpoint = run.data.tags["psat.checkpoint"]
        assert Path(checkpoint, "state.pt").is_file()
        finished[norm] = checkpoint
        assert run.data.params["model.embedding_dim"] == "4"
        assert run.data.params["model.init"] == "fan_in"
        assert run.data.params["training.optimizer.name"] == "adam"
        assert run.data.params["training.baselines.name"] == "sgd"
        assert run.data.params["training.optimizer.generator.lr"] == "1.0"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [0, 1, 2]
        assert 0 <= run.data.metrics["clean"] <= 1 and "linf" in run.data.metrics
        # the member is used by its epoch of best validation trade-off (the later of a tie)
        trade_off = {
            m.step: m.value for m in client.get_metric_history(run.info.run_id, "trade_off")
        }
        best = max(trade_off, key=lambda epoch: (trade_off[epoch], epoch))
        chosen = run.data.tags["psat.checkpoint_chosen"]
        assert chosen == f"epoch {best + 1}/3: best validation trade_off {trade_off[best]:.4f}"
        assert load_state(checkpoint)["epoch"] == best
    for norm, run in runs.items():
        starts = client.get_metric_history(run.info.run_id, "epoch_start")
        ends = client.get_metric_history(run.info.run_id, "epoch_end")
        intervals[norm] = (min(m.value for m in starts), max(m.value for m in ends))
    # every pair of members was training at the same time
    latest_start = max(start for start, _ in intervals.values())
    earliest_end = min(end for _, end in intervals.values())
    assert latest_start < earliest_end, intervals

    # a damaged checkpoint on resume: one ValueError naming the model and file, not Ray's report
    saved = [
        p
        for p in Path(job.storage.path, job.name, f"{job.name}-l2").glob("checkpoint_*")
        if p.is_dir()
    ]
    intact = {p / "state.pt": (p / "state.pt").read_bytes() for p in saved}
    for state, data in intact.items():  # whichever of them Ray resumes from
        state.write_bytes(data[:300])
    with pytest.raises(ValueError, match="^l2: .*state.pt: not a loadable psat checkpoint") as err:
        train_members(job, echo=lambda line: None)
    assert "\n" not in str(err.value) and str(err.value).split(": ")[1] in map(str, intact)
    for state, data in intact.items():
        state.write_bytes(data)

    lines = []
    results = train_members(job, echo=lines.append)
    assert any(line.startswith("[l2] started resuming at epoch") for line in lines), lines
    assert "[linf] already trained (3/3 epochs)" in lines, lines  # no trainer started for it
    assert not any(line.startswith(("[linf] started", "[l1] started")) for line in lines)
    assert results["l2"]["metrics"]["epoch"] == 2
    assert {n: results[n]["checkpoint"] for n in finished} == finished  # not trained again
    _, runs_after = _member_runs(job)
    assert {n: r.info.run_id for n, r in runs_after.items()} == {
        n: r.info.run_id for n, r in runs.items()
    }
    assert all(r.info.status == "FINISHED" for r in runs_after.values())
    history = client.get_metric_history(runs["linf"].info.run_id, "loss")
    assert len(history) == 3


def test_bad_config_fails_fast_and_leaves_nothing(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\ntraining:\n  epochs: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train_members", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "training.epochs" in proc.stderr and "-1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no mlflow.db, no runs


@pytest.mark.parametrize(
    ("resources", "torch_loaded"),
    [({"workers_per_member": 1}, False), ({"workers_per_member": 2, "ddp_backend": "gloo"}, True)],
)
def test_a_single_worker_needs_no_process_group_and_its_controller_no_torch(
    resources, torch_loaded
):
    """DDP's process group (Ray's TorchConfig) only for several workers per model; what a
    single worker's run controller unpickles does not import torch."""
    import pickle

    from orchestrator.training.trainer import collective

    backend = collective(parse_config({"name": "b", "resources": resources}).resources)
    assert getattr(backend, "backend", None) == ("gloo" if torch_loaded else "none")
    unpickle = "import pickle, sys; pickle.load(sys.stdin.buffer); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", unpickle], input=pickle.dumps(backend),
                          capture_output=True, check=True)  # fmt: skip
    assert proc.stdout.decode().strip() == str(torch_loaded)
