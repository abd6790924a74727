"""One job per name at a time, and one creator per fresh tracking store.

Both are `flock`s on a file: the kernel releases them when the holder exits or dies, so a
killed job never leaves a stale lock behind (NFS mounts, EFS included, carry flock as a POSIX
lock). The job lock lives in the job's storage folder, where every node of a cluster sees it.
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

LOCK_FILE = "job.lock"


class JobBusyError(ValueError):
    """Another process holds the job's name."""


def _job_folder(job: JobConfig) -> Path | None:
    """`<storage.path>/<name>` for local or mounted storage; None for a URI (s3://, ...)."""
    storage = job.storage.resolved()
    if "://" in storage:
        return None
    root = Path(storage)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"storage.path {storage} is a file; expected a folder (or a URI)")
    return root / job.name


@contextmanager
def job_lock(job: JobConfig, command: str) -> Iterator[None]:
    """Hold job `job.name` for the block; a second holder is refused with JobBusyError.

    Storage given as a URI (s3://, gs://) has no file lock: there the name is not guarded.
    """
    folder = _job_folder(job)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                who = json.loads(holder)
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["since"]))
                held = f"`psat {who['command']}` (pid {who['pid']} on {who['host']}, since {since})"
            except (ValueError, KeyError, TypeError):
                held = "another process"
            raise JobBusyError(
                f"job {job.name!r} is running: {held} holds {folder / LOCK_FILE}; wait for it "
                "to end or choose another name"
            ) from None
        about = {"command": command, "pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(about | {"since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block (waits for other holders)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
