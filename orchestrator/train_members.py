"""The training job (`psat train`): materialize data, fit the members concurrently, track
them in MLflow.

validate config -> connect Ray -> Parquet shards -> MLflow parent + a run per member
-> `training.driver.train_models`: one TorchTrainer per member, concurrently -> checkpoints
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.config import JobConfig
from orchestrator.runtime.capacity import check_ray, one_model
from orchestrator.runtime.ray_session import prepare_job
from orchestrator.runtime.tracking import TRAIN, Tracker
from orchestrator.training.driver import train_models
from orchestrator.training.plan import psat_members


def train_members(job: JobConfig, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """The training job: fit the job's PSAT members concurrently under one MLflow parent run;
    return per member its final metrics, checkpoint and run id.

    Relaunching with the same `job.name` resumes unfinished members from their latest
    checkpoint and keeps logging into the same MLflow runs.
    """
    plans = psat_members(job)
    res = job.resources
    check_ray(
        job, one_model(job, "train")
    )  # what can be refused before Ray starts is refused first
    tracker = Tracker(job)
    tracker.resumable(TRAIN)
    manifest = prepare_job(job, len(plans) * res.cpus_per_model)
    with tracker.job_run(TRAIN) as parent:
        results = train_models(job, plans, manifest, tracker, parent, len(plans), echo)
    echo(f"members finished; MLflow parent run {parent}")
    return results
