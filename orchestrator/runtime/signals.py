"""Signals: SIGTERM ends a job like Ctrl-C, and `ray.init` does not take that away.

The CLI installs `exit_on_sigterm` once per job process; `sigterm_kept` wraps every `ray.init`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_first_sigterm: list[float] = []


class Terminated(SystemExit):
    """The process got SIGTERM: it ends like Ctrl-C, with the shells' exit status 143."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


SIGTERM_GRACE_S = 2.0  # a store write finishes in well under this; a network wait may not


def exit_on_sigterm() -> None:
    """SIGTERM ends the job like Ctrl-C, its runs marked KILLED on the way out
    (`tracking.ended_status`).

    One that arrives inside a SQLAlchemy call (a write to a SQLite store) is sent again 0.1 s
    later, for at most SIGTERM_GRACE_S: exiting half-way through the write can leave the store
    locked and the runs RUNNING. Nothing else defers it: not an HTTP request, whose retries can
    last minutes. `ray.init`, which installs a handler of its own, keeps it
    (`sigterm_kept`).
    """
    _first_sigterm.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame) -> None:
    if not _first_sigterm:
        _first_sigterm.append(time.monotonic())
    if time.monotonic() - _first_sigterm[0] < SIGTERM_GRACE_S:
        while frame is not None:
            if frame.f_globals.get("__name__", "").partition(".")[0] == "sqlalchemy":
                threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()
                return
            frame = frame.f_back
    raise Terminated()


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """`ray.init` installs its own SIGTERM handler; keep the process's (the CLI's
    `exit_on_sigterm`, which never exits half-way through a SQLite store write)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
