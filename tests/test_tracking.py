"""MLflow tracking helpers on a real SQLite store."""

import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import parse_config
from orchestrator.runtime.tracking import Tracker, ensure_experiment


class RacedClient(MlflowClient):
    """Another job creates the experiment right after this client's first lookup finds none."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.other_job = MlflowClient(uri)
        self.raced_id: str | None = None

    def get_experiment_by_name(self, name):
        found = super().get_experiment_by_name(name)
        if found is None and self.raced_id is None:
            self.raced_id = self.other_job.create_experiment(name)
        return found


def test_experiment_created_once_and_found_again(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = ensure_experiment(client, "exp", (tmp_path / "art").as_uri())
    assert ensure_experiment(client, "exp", None) == created
    assert client.get_experiment(created).artifact_location == (tmp_path / "art").as_uri()


def test_experiment_created_by_a_racing_job_is_used(tmp_path):
    client = RacedClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = ensure_experiment(client, "exp", None)
    assert client.raced_id is not None and found == client.raced_id
    assert [e.experiment_id for e in client.search_experiments(filter_string="name = 'exp'")] == [
        found
    ]


# a function that runs as library code would: SIGTERM arrives half-way through a call that
# lasts `seconds` (a store write, or an HTTP request retrying against a server that is down)
SIGTERM_IN_A_CALL = """
import os, signal, sys, time
from orchestrator.cli import exit_on_sigterm
exit_on_sigterm()
module, seconds = sys.argv[1], float(sys.argv[2])
call = '''
def call():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(seconds)  # the handler has run; the call goes on
    print("call finished", flush=True)
'''
code = {"__name__": module, "os": os, "signal": signal, "time": time, "seconds": seconds}
exec(call, code)
code["call"]()
time.sleep(5)
print("not stopped", flush=True)
"""


@pytest.mark.parametrize(
    ("module", "seconds", "finished"),
    [
        ("sqlalchemy.engine.fake", 0.05, True),  # a store write: it finishes, then the exit
        ("sqlalchemy.engine.fake", 30, False),  # deferred for SIGTERM_GRACE_S at most
        ("mlflow.utils.rest_utils", 30, False),  # an HTTP wait: never deferred
    ],
)
def test_sigterm_waits_only_for_a_quick_store_write(module, seconds, finished):
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_A_CALL, module, str(seconds)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stdout == ("call finished\n" if finished else ""), done.stderr
    assert time.monotonic() - start < 15  # the interpreter's start-up included


def _job(tmp_path, name="life"):
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "e"}
    return parse_config({"name": name, "tracking": tracking})


def test_a_job_run_finishes_with_its_block_and_restores_the_tracking_uri(tmp_path):
    tracker = Tracker(_job(tmp_path))
    before = mlflow.get_tracking_uri()
    with tracker.job_run("train") as run_id:
        assert mlflow.get_tracking_uri() == tracker.uri != before
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert mlflow.get_tracking_uri() == before
    assert tracker.client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("error", "status"), [(ValueError("bad member"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_job_run_left_by_an_error_ends_its_running_children_alike(tmp_path, error, status):
    tracker = Tracker(_job(tmp_path))
    before = mlflow.get_tracking_uri()
    with pytest.raises(type(error)), tracker.job_run("train") as parent:
        done = tracker.child_run(parent, "done", "model", {}, **{"psat.plan": "linf"})
        tracker.end(done, "FINISHED")
        running = tracker.child_run(parent, "running", "model", {}, **{"psat.plan": "l2"})
        raise error
    statuses = {r: tracker.client.get_run(r).info.status for r in (parent, done, running)}
    assert statuses == {parent: status, done: "FINISHED", running: status}
    assert mlflow.get_tracking_uri() == before
