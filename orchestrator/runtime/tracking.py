"""MLflow tracking for psat jobs: a parent run per job, nested runs per member or trial.

All MLflow writes go through the driver process (one writer per store, which SQLite needs);
runs are found again by their `psat.*` tags, so a relaunched job keeps logging into its runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, JobConfig
from orchestrator.runtime.locking import file_lock
from orchestrator.runtime.reach import check_server

log = logging.getLogger(__name__)

# Every tag psat writes, here and nowhere else. Runs are found again by their tags.
JOB_TAG = "psat.job"  # every run: the job's name
ROLE_TAG = "psat.role"  # every run: one of the roles below
TRAIN, SWEEP, AGGREGATE, REPRODUCE = "train", "sweep", "aggregate", "reproduce"  # a job's run
MODEL, TRIAL = "model", "trial"  # a run nested under a job's: one trained model, one Tune trial
# a model's final checkpoint (psat.checkpoint.<plan> on its parent)
CHECKPOINT_TAG = "psat.checkpoint"
CHOSEN_TAG = "psat.checkpoint_chosen"  # which epoch's checkpoint, and why (training.checkpoint)
PLAN_TAG = "psat.plan"  # a model's run: the plan's name (a member's norm, "at_linf", "h8_l2")
PLACEMENT_TAGS = ("device", "gpu_ids", "node")  # psat.<key>: where a model's worker trained
TRIAL_TAG = "psat.trial"  # a trial's run: Tune's trial id
TRAIN_RUN_TAG = "psat.train_run"  # an aggregate run: the training run it took its members from
VERSION_TAG = "psat.registered_version"  # an aggregate run: the version it registered
# a registered version's tags (the artifact store cannot rewrite them)
TRADE_OFF_TAG, STRATEGY_TAG = "psat.trade_off", "psat.strategy"
MEMBERS_TAG, RUN_TAG, PARTIAL_TAG = "psat.members", "psat.run_id", "psat.partial"
MEMBER_TAG = "psat.member"  # psat.member.<name>: that member's MemberSpec.describe()
DIGEST_TAG = "psat.sha256"  # psat.sha256.<name>: that member's checkpoint digest
PARENT_TAG = "mlflow.parentRunId"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to `mlartifacts/` beside the database file, not to the
    current directory; a tracking server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


RETURN_WAIT_S = 60.0  # how long a job whose server went away waits for it to end its runs


def _answers(uri: str) -> bool:
    try:
        check_server(uri, timeout=2)
    except ConfigError:
        return False
    return True


def open_store(uri: str) -> MlflowClient:
    """A client of `uri`; a server must answer first (`check_server`). A SQLite store is
    created (schema and migrations) by one process at a time: jobs that start together on a
    fresh file would otherwise race in the migration."""
    if not uri.startswith("sqlite:///"):
        check_server(uri)
        return MlflowClient(uri)
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.parent.is_dir():
        raise ConfigError(f"tracking.uri {uri}: folder {database.parent} does not exist")
    with file_lock(database.with_name(database.name + ".lock")):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates or migrates the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
    return client


def ensure_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    """The id of experiment `name`, created if missing; jobs that start together race for it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another job created it


def ended_status(err: BaseException) -> str:
    """The MLflow status of a run its job left by `err`: interrupted (Ctrl-C, SIGTERM) or not."""
    return "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"


@contextmanager
def tracking(uri: str | None) -> Iterator[None]:
    """Use tracking (and registry) URI ``uri`` for the fluent MLflow API inside the block."""
    if uri is None:
        yield
        return
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


class Tracker:
    """A job's MLflow experiment: its runs found or created by their tags, and their lifecycle.

    Every job opens its run with :meth:`job_run` (or :meth:`run`): FINISHED when the block ends,
    else KILLED (Ctrl-C, SIGTERM) or FAILED, with its nested runs still RUNNING; the job's
    tracking URI is MLflow's for the block.
    """

    def __init__(self, job: JobConfig):
        self.job = job
        self.uri = job.tracking.resolved_uri()
        self.client = open_store(self.uri)
        self.experiment_id = ensure_experiment(
            self.client, job.tracking.experiment, artifact_location(self.uri)
        )

    @contextmanager
    def run(self, run_id: str) -> Iterator[str]:
        """Run `run_id` for the block (see the class); yields it."""
        with tracking(self.uri):
            try:
                yield run_id
            except BaseException as err:
                status = ended_status(err)
                if status == "FAILED" and not _answers(self.uri):
                    raise ConnectionError(self._end_when_back(run_id, status)) from None
                self.end(run_id, status, nested=True)
                raise
            self.end(run_id, "FINISHED")

    def _end_when_back(self, run_id: str, status: str) -> str:
        """The job failed because its tracking server went away: wait up to RETURN_WAIT_S for
        it to answer again and end the runs, so none is left RUNNING. Returns what happened."""
        lost = f"the MLflow tracking server {self.uri} stopped answering during the job"
        log.warning("%s; waiting up to %.0f s for it to end the job's runs", lost, RETURN_WAIT_S)
        deadline = time.monotonic() + RETURN_WAIT_S
        while time.monotonic() < deadline:
            if _answers(self.uri):
                self.end(run_id, status, nested=True)
                return f"{lost}; its runs are marked {status}: run it again to resume"
            time.sleep(1.0)
        return (
            f"{lost} and did not answer within {RETURN_WAIT_S:.0f} s: its runs stay RUNNING "
            "until the job runs again under the same name, which resumes them"
        )

    @contextmanager
    def job_run(self, role: str) -> Iterator[str]:
        """The job's parent run for `role` ("train", "sweep", ...), created or resumed, for the
        block. Resuming a job under the same name with a different config is a ConfigError."""
        with self.run(self._job_run_id(role)) as run_id:
            yield run_id

    def end(self, run_id: str, status: str, nested: bool = False) -> None:
        """End `run_id` with `status`; with `nested`, its nested runs still RUNNING too."""
        if nested:
            running = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'",
            )
            for child in running:
                self.client.set_terminated(child.info.run_id, status)
        self.client.set_terminated(run_id, status)

    def find(self, **tags: str) -> Run | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], query, max_results=1)
        return runs[0] if runs else None

    def resumable(self, role: str) -> Run | None:
        """The job's earlier `role` run, if any; a ConfigError if it ran with another config
        (settings a newer psat added are not compared). Jobs ask before they start Ray: a
        refusal costs no start-up."""
        existing = self.find(**{JOB_TAG: self.job.name, ROLE_TAG: role})
        if existing is None:
            return None
        recorded = existing.data.params  # a setting it lacks is newer than that run
        params = self.params().items()
        changed = {k: (recorded[k], v) for k, v in params if k in recorded and recorded[k] != v}
        if changed:
            first = ", ".join(
                f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:3]
            )
            raise ConfigError(
                f"job {self.job.name!r} already ran with a different config ({first}); "
                "resume with the same config or choose a new name"
            )
        return existing

    def _job_run_id(self, role: str) -> str:
        existing = self.resumable(role)
        if existing is not None:
            self.client.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id
        tags = {JOB_TAG: self.job.name, ROLE_TAG: role}
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.job.name}-{role}", tags=tags
        )
        self.log_params(run.info.run_id, self.params())
        return run.info.run_id

    def child_run(
        self, parent_id: str, name: str, role: str, params: dict[str, str], **tags: str
    ) -> str:
        """A nested run under `parent_id`, created or resumed by its tags (RUNNING again,
        unless it FINISHED: its work is done)."""
        tags = {JOB_TAG: self.job.name, ROLE_TAG: role, PARENT_TAG: parent_id, **tags}
        existing = self.find(**tags)
        if existing is not None:
            if existing.info.status != "FINISHED":
                self.client.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.log_params(run_id, params)
        return run_id

    def params(self) -> dict[str, str]:
        """The job's config as flat MLflow params (the Ray address is where, not what)."""
        return flatten(self.job.model_dump(exclude={"resources": {"address"}}))

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        items = [
            mlflow.entities.Metric(k, float(v), int(1000 * time.time()), step)
            for k, v in metrics.items()
            if isinstance(v, int | float)
        ]
        self.client.log_batch(run_id, metrics=items)
