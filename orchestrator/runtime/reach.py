"""Whether the services a command uses answer, checked before torch, Ray or MLflow load: the
Ray head (a TCP connection) and the MLflow tracking server (GET /health). An unreachable one is
a ConfigError naming it, before anything is written (`orchestrator.cli`), and again where a job
connects (`ray_session.join_cluster`, `tracking.open_store`).
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.config import ConfigError, JobConfig
from orchestrator.config.locations import is_uri, scheme

REACH_TIMEOUT_S = 5  # a service that has not answered by then is down or elsewhere


def check_services(job: JobConfig) -> None:
    """The job's tracking server (`tracking.uri`, else $MLFLOW_TRACKING_URI) and the Ray cluster
    it joins (`resources.address`, else $RAY_ADDRESS) answer."""
    check_server(job.tracking.resolved_uri())
    address = job.resources.ray_address()
    if address:
        check_address(address)
    check_storage(job.storage.resolved())


def check_storage(location: str) -> None:
    """Object storage (`storage.path` as a URI: s3://, gs://, ...) answers: its folder, or the
    bucket it would be written into, can be looked up with the credentials and endpoint
    pyarrow finds (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Local paths pass."""
    if not is_uri(location) or scheme(location) == "file":
        return
    import pyarrow.fs as pafs  # only for object storage

    try:
        fs, path = pafs.FileSystem.from_uri(location)
        bucket = path.split("/", 1)[0]  # the folder may not exist yet; its bucket must
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"storage.path {location} cannot be reached ({str(err).strip().splitlines()[-1]}); "
            "check its endpoint (AWS_ENDPOINT_URL for an S3-compatible server) and credentials"
        ) from None
    if not found:
        raise ConfigError(f"storage.path {location}: bucket {bucket!r} does not exist; create it")


def check_address(address: str) -> None:
    """A Ray address `host:port` (or `ray://host:port`) must accept a TCP connection within
    REACH_TIMEOUT_S; `auto`, `local` and other forms are Ray's to resolve."""
    if "://" in address.removeprefix("ray://"):
        return  # a URL (a dashboard's, say): Ray's own error names it
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({reason}); check resources.address "
            "or RAY_ADDRESS, or leave both unset for a local Ray"
        ) from None


def check_server(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """An http(s) tracking URI must answer as an MLflow server within `timeout` seconds: else
    a ConfigError naming it, before any work (other URIs pass). A 401 or 403 is an answer (a
    server behind an auth proxy): whether it takes the credentials shows on the first request."""
    if not uri.startswith(("http://", "https://")):
        return
    fix = "fix tracking.uri, MLFLOW_TRACKING_URI or --tracking-uri"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return
        raise ConfigError(
            f"{uri} does not answer as an MLflow tracking server (GET /health: HTTP "
            f"{err.code}); {fix}"
        ) from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(
            f"cannot reach the MLflow tracking server {uri} ({reason}); {fix}"
        ) from None


def check_store(uri: str) -> None:
    """A store to read from: a SQLite URI must name an existing file (reading never creates
    a store), a server must answer (`check_server`); else one line saying so."""
    check_server(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no MLflow store at {uri}; set --tracking-uri or MLFLOW_TRACKING_URI to the "
            "store the model was registered in"
        )
