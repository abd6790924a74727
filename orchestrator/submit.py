"""Submit a psat job to a Ray cluster through the Ray Jobs API and follow it to the end.

`psat submit train --config my.yaml --address http://head:8265` runs
`python -m jobs.train_members --config my.yaml` on the cluster as the Ray job
`<name>-<command>-<UTC time>` (metadata: `psat_job`, `psat_command`), prints that id, streams
the job's progress and exits with the job's status. A psat job of the same name still pending
or running on the cluster is refused before anything is uploaded. What travels with the job:

- psat's own code, as `runtime_env.py_modules` (the installed `psat_core`, `orchestrator` and
  `jobs` packages, wherever pip put them); the cluster's Python brings the third-party
  dependencies (`ray_cluster.yaml` installs them on every node);
- the config file, from wherever it is, as the job's only `working_dir` file;
- `MLFLOW_TRACKING_URI` from this shell, and every variable named with `--env`.

The job runs in Ray's temporary copy of that working dir, so every location that must outlive
it (`storage.path`, the MLflow store, `reproduce.output`) must be an absolute path or a URI:
`config.check_cluster_locations` refuses anything else here, before uploading, and again inside
the job (for plain `ray job submit`).

Token authentication (on by default for clusters started with `ray start` in recent Ray
releases): the token comes from `--token`, else $RAY_AUTH_TOKEN, else the file named by
$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (where `ray start` writes it; `ray get-auth-token`
prints it). It is sent as an `Authorization: Bearer` header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jobs
import orchestrator
import psat_core
from orchestrator.config import ConfigError, check_cluster_locations, load_config, parse_overrides
from orchestrator.runtime.reach import check_server

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)
SDK_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")
PACKAGES = (psat_core, orchestrator, jobs)  # psat's code, wherever pip installed it
EXCLUDES = ["__pycache__", "*.pyc"]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)
JOB_KEY, COMMAND_KEY = "psat_job", "psat_command"  # the Ray job's metadata
# Ray's own chatter in a job's log: shown with -v, else only in `ray job logs`
RAY_NOISE = re.compile(
    r"^\s*(\x1b\[[0-9;]*m)*\((raylet|PreemptionWatcher|TrainController|PlacementGroupCleaner"
    r"|SynchronizationActor|DatasetManager|autoscaler|RayTrainWorker)\b"
    r"|^\s*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) (worker|job_manager|sdk)\.py"
    r"|PYTHON worker processes have been started"
)


class AuthError(ValueError):
    """The cluster refused this client's token (or found none)."""


def auth_token(token: str | None = None) -> tuple[str | None, str]:
    """The token to send and where it came from (or where none was found), for error messages."""
    if token is not None:
        return token, "--token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"], "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        source = f"$RAY_AUTH_TOKEN_PATH ({path})"
    else:
        path = Path.home() / ".ray" / "auth_token"
        source = str(path)
    if path.is_file():
        return path.read_text().strip() or None, source
    return None, f"--token, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, {path}"


def connect(address: str, token: str | None = None, verbose: bool = False) -> JobSubmissionClient:
    """A Jobs client of the cluster at `address`; unreachable or refused is one clear error.
    Ray loads here, after everything `submit` refuses without it."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not verbose:  # Ray's INFO lines about uploads and websockets, set to INFO at import
        for name in SDK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    value, source = auth_token(token)
    headers = {"Authorization": f"Bearer {value}"} if value else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if value:
            problem = f"refused the auth token from {source}"
        else:
            problem = f"requires an auth token and none was found (looked in {source})"
        raise AuthError(
            f"the Ray cluster at {address} {problem}; pass the head's token with --token or "
            "$RAY_AUTH_TOKEN (`RAY_AUTH_MODE=token ray get-auth-token` on the head prints it)"
        ) from None
    except (ConnectionError, RuntimeError) as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}") from None


def job_env(names: list[str]) -> dict[str, str]:
    """Variables for the job: MLFLOW_TRACKING_URI if set here, then each `--env NAME` (value
    from this shell) or `--env NAME=VALUE`."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    for item in names:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--env expects NAME or NAME=VALUE, got {item!r}")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: no such variable in this shell; use {name}=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def submit(
    command: str,
    module: str,
    config: str,
    address: str,
    overrides: list[str] = (),
    job_args: list[str] = (),
    *,
    token: str | None = None,
    env_names: list[str] = (),
    echo: Callable[[str], None] = print,
    follow: bool = True,
    verbose: bool = False,
) -> int:
    """Submit job `command` (`python -m <module>`) with `config`, `--set overrides` and the
    job's own `job_args`; return 0 if the job succeeded (or was only submitted, without `follow`).

    Everything the job would refuse is refused here first, before anything is uploaded.
    """
    env = job_env(list(env_names))
    path = Path(config)
    job = load_config(path, parse_overrides(list(overrides)))
    check_cluster_locations(job, command, env)
    # a server this machine cannot reach is refused here (one the cluster alone reaches is too)
    check_server(job.tracking.uri or env.get("MLFLOW_TRACKING_URI", ""))
    client = connect(address, token, verbose)
    refuse_running(client, job.name)
    args = ["python", "-m", module, *(["-v"] if verbose else []), "--config", path.name]
    args += job_args
    entrypoint = shlex.join(args + [a for s in overrides for a in ("--set", s)])
    with tempfile.TemporaryDirectory(prefix="psat-submit-") as staging:
        shutil.copyfile(path, Path(staging) / path.name)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=f"{job.name}-{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
            metadata={JOB_KEY: job.name, COMMAND_KEY: command},
            runtime_env={
                "working_dir": staging,
                "py_modules": [str(Path(package.__file__).parent) for package in PACKAGES],
                "excludes": EXCLUDES,
                "env_vars": env,
            },
        )
    echo(f"submitted {job_id}: {entrypoint}")
    if not follow:
        return 0
    asyncio.run(_tail(client, job_id, echo, verbose))
    status = client.get_job_status(job_id)
    echo(f"job {job_id} {status.value}")
    succeeded = status.value == "SUCCEEDED"
    if not succeeded and not verbose:
        echo(f"full log: RAY_AUTH_MODE=token ray job logs --address {address} {job_id}")
    return 0 if succeeded else 1


def refuse_running(client: JobSubmissionClient, name: str) -> None:
    """A ConfigError if a psat job named `name` is pending or running on the cluster (two would
    share its storage and runs)."""
    for found in client.list_jobs():
        if (found.metadata or {}).get(JOB_KEY) == name and not found.status.is_terminal():
            raise ConfigError(
                f"job {name!r} is already {found.status.value.lower()} on the cluster as "
                f"{found.submission_id}; wait for it, stop it (ray job stop "
                f"{found.submission_id}), or set another name"
            )


async def _tail(
    client: JobSubmissionClient, job_id: str, echo: Callable[[str], None], verbose: bool
) -> None:
    async for lines in client.tail_job_logs(job_id):
        for line in lines.splitlines():
            if verbose or not RAY_NOISE.search(line):
                echo(line)
            else:
                log.debug("%s", line)
