"""Refusing, before any work, locations that would not outlive a Ray job: inside Ray Jobs the
working dir is Ray's temporary copy, deleted after the job."""

from __future__ import annotations

import os

from orchestrator.config.file import ConfigError
from orchestrator.config.locations import durable
from orchestrator.config.schema import JobConfig


def in_ray_job(env=os.environ) -> bool:
    """True inside a Ray Jobs entrypoint (`ray job submit`, `psat submit`)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in env


def check_cluster_locations(job: JobConfig, command: str, env=os.environ) -> None:
    """Refuse locations that would not outlive a Ray job.

    A Ray job runs in Ray's temporary copy of its working dir, deleted after the job: a relative
    `storage.path`, MLflow store or `reproduce.output` would land there and be lost. `env` is
    the job's environment (its MLFLOW_TRACKING_URI counts when `tracking.uri` is unset).
    """
    fix = "give an absolute path on storage every node shares, or a URI"
    if not durable(job.storage.path):
        raise ConfigError(
            f"storage.path {job.storage.path!r} is relative; inside a Ray job it would land in "
            f"Ray's temporary working dir and be deleted: {fix} (e.g. /mnt/psat/runs, s3://…)"
        )
    uri = job.tracking.uri or env.get("MLFLOW_TRACKING_URI")
    if uri is None:
        raise ConfigError(
            "tracking.uri is unset and MLFLOW_TRACKING_URI is not set: inside a Ray job the "
            "default ./mlflow.db would land in Ray's temporary working dir and be deleted; "
            "export MLFLOW_TRACKING_URI=http://HEAD:5000 (psat submit forwards it) or set "
            "tracking.uri"
        )
    if not durable(uri):
        raise ConfigError(
            f"tracking.uri {uri!r} is a relative local store; inside a Ray job it would land in "
            f"Ray's temporary working dir and be deleted: use a tracking server "
            "(http://HEAD:5000) or an absolute sqlite:////path"
        )
    if command == "reproduce" and not durable(job.reproduce.output):
        raise ConfigError(
            f"reproduce.output {job.reproduce.output!r} is relative; inside a Ray job it would "
            f"land in Ray's temporary working dir and be deleted: {fix}"
        )
