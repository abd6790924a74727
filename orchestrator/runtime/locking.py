"""One job per name at a time, and one creator per fresh tracking store.

Both are `flock`s on a file: the kernel releases them when the holder exits or dies, so a
killed job never leaves a stale lock behind (NFS mounts, EFS included, carry flock as a POSIX
lock). The job lock lives in the job's storage folder, where every node of a cluster sees it.
Storage given as a URI (s3://, gs://) has no folder to lock: on a Ray cluster the job's name is
held by a named actor instead, which Ray ends with the driver that owns it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.config import ConfigError, JobConfig
from orchestrator.config.locations import is_uri

LOCK_FILE = "job.lock"


class JobBusyError(ValueError):
    """Another process holds the job's name."""


def _job_folder(job: JobConfig) -> Path | None:
    """`<storage.path>/<name>` for local or mounted storage; None for a URI (s3://, ...)."""
    storage = job.storage.resolved()
    if is_uri(storage):
        return None
    root = Path(storage)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"storage.path {storage} is a file; expected a folder (or a URI)")
    return root / job.name


def _busy(job: JobConfig, holder: str, where: str) -> JobBusyError:
    try:
        who = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["since"]))
        held = f"`psat {who['command']}` (pid {who['pid']} on {who['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        held = "another process"
    return JobBusyError(
        f"job {job.name!r} is running: {held} holds {where}; wait for it to end or choose "
        "another name"
    )


@contextmanager
def job_lock(job: JobConfig, command: str) -> Iterator[None]:
    """Hold job `job.name` for the block; a second holder is refused with JobBusyError.

    URI storage is guarded on a cluster only (a local Ray per job has nothing to share).
    """
    about = json.dumps(
        {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    )
    folder = _job_folder(job)
    if folder is None:
        with _cluster_lock(job, about):
            yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            raise _busy(job, holder, str(folder / LOCK_FILE)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, about.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _name_holder():
    """An actor class that holds a job's name while its driver lives (non-detached). Defined
    in a function, so that Ray ships it by value: nodes need not have psat installed."""
    import ray  # here, not above: tracking needs `file_lock`, and loading a model no Ray

    class JobName:
        def __init__(self, about: str) -> None:
            self.about = about

        def holder(self) -> str:
            return self.about

    return ray.remote(num_cpus=0)(JobName)


@contextmanager
def _cluster_lock(job: JobConfig, about: str) -> Iterator[None]:
    import ray

    from orchestrator.runtime.ray_session import join_cluster

    if join_cluster(job) is None:
        yield
        return
    name, namespace = f"psat-job-{job.name}", "psat-jobs"
    try:
        actor = _name_holder().options(name=name, namespace=namespace).remote(about)
    except ValueError:  # the name is taken
        try:
            holder = ray.get(ray.get_actor(name, namespace).holder.remote())
        except (ValueError, ray.exceptions.RayActorError):
            holder = ""
        raise _busy(job, holder, f"the Ray actor {namespace}/{name}") from None
    try:
        yield
    finally:
        ray.kill(actor)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block (waits for other holders)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
