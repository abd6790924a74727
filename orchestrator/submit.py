"""Submit a psat job to a Ray cluster through the Ray Jobs API and follow it to the end.

`psat submit train --config jobs/configs/x.yaml --address http://head:8265` runs
`python -m jobs.train_members --config jobs/configs/x.yaml` on the cluster with this project as
the job's `working_dir`, prints the job id, streams its logs and exits with the job's status.

Token authentication (on by default for clusters started with `ray start` in recent Ray
releases): the token comes from `--token`, else $RAY_AUTH_TOKEN, else the file named by
$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (where `ray start` writes it; `ray get-auth-token`
prints it). It is sent as an `Authorization: Bearer` header.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from orchestrator.config import ConfigError, load_config, parse_overrides

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "train": "jobs.train_members",
    "sweep": "jobs.sweep",
    "aggregate": "jobs.aggregate",
    "run": "jobs.run",
    "reproduce": "jobs.reproduce",
}
EXCLUDES = [".git", ".venv", ".venv-ci", "psat_runs", "mlruns", "mlartifacts", "mlflow.db", "out"]


def auth_headers(token: str | None = None) -> dict[str, str]:
    if token is None:
        token = os.environ.get("RAY_AUTH_TOKEN")
    if token is None:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        if path.is_file():
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(
    job_name: str,
    config: str,
    address: str,
    overrides: list[str] = (),
    token: str | None = None,
    echo: Callable[[str], None] = print,
    follow: bool = True,
) -> int:
    """Submit `jobs.<job>` with `config`; return 0 if the job succeeded (or was only submitted).

    The config must live inside the project (it travels in the working_dir). Local storage
    paths and the MLflow tracking URI are resolved here, so a head node on this machine writes
    where the submitter reads; on a real cluster use shared storage (s3://, NFS) and an MLflow
    server.
    """
    if job_name not in JOBS:
        raise ConfigError(f"unknown job {job_name!r}; allowed: {', '.join(JOBS)}")
    path = Path(config).resolve()
    job = load_config(path, parse_overrides(list(overrides)))  # fail here, not on the cluster
    try:
        relative = path.relative_to(PROJECT_ROOT)
    except ValueError:
        raise ConfigError(
            f"config {config} is outside the project {PROJECT_ROOT}; put it under jobs/configs/ "
            "so it travels with the job's working_dir"
        ) from None
    sets = [*overrides, f"storage.path={job.storage.resolved()}"]
    args = ["python", "-m", JOBS[job_name], "--config", str(relative)]
    entrypoint = shlex.join(args + [a for s in sets for a in ("--set", s)])
    try:
        client = JobSubmissionClient(address, headers=auth_headers(token))
    except (ConnectionError, RuntimeError) as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}") from None
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(PROJECT_ROOT),
            "excludes": EXCLUDES,
            "env_vars": {"MLFLOW_TRACKING_URI": job.tracking.resolved_uri()},
        },
    )
    echo(f"submitted {job_id}: {entrypoint}")
    if not follow:
        return 0
    asyncio.run(_tail(client, job_id, echo))
    status = client.get_job_status(job_id)
    echo(f"job {job_id} {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _tail(client: JobSubmissionClient, job_id: str, echo: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):
        for line in lines.splitlines():
            echo(line)
