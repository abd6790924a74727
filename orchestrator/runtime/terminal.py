"""What reaches the terminal: a live status line (`StatusLine`) and libraries' prints sent to
psat's debug log instead (`prints_to_log`, shown with `psat -v`)."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from typing import TextIO

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``seconds`` as people read a wall time: 1h 02m 03s, 2m 05s, 7s."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class StatusLine:
    """Live lines rewritten in place on a terminal (at most once per `every` seconds), kept
    below the lines printed through it; nothing live where the output is not a terminal (CI,
    Ray job logs), only the printed lines. `show` takes one line, or several joined by
    newlines (one per row of an evaluation)."""

    CLEAR = "\r\x1b[K"  # to the line's start, and clear it
    UP = "\x1b[1A\x1b[K"  # one line up, and clear it

    def __init__(self, stream: TextIO | None = None, every: float = 1.0) -> None:
        self.stream = stream or sys.stdout  # the terminal, even inside `prints_to_log`
        self.every, self.shown, self.last = every, "", 0.0
        self.live = self.stream.isatty()

    def _clear(self) -> str:
        return self.CLEAR + self.UP * self.shown.count("\n")

    def show(self, text: str) -> None:
        if self.live and time.monotonic() - self.last >= self.every:
            self.stream.write(self._clear() + text)
            self.stream.flush()
            self.shown, self.last = text, time.monotonic()

    def print(self, line: str) -> None:
        prefix = self._clear() if self.live and self.shown else ""
        suffix = self.shown if self.live else ""
        self.stream.write(f"{prefix}{line}\n{suffix}")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.shown:
            self.stream.write(self._clear())
            self.stream.flush()
        self.shown = ""


@contextmanager
def prints_to_log(stdout: bool = False) -> Iterator[None]:
    """What libraries print on stderr (and on stdout with `stdout`) inside the block goes to
    psat's debug log (`psat -v`), line by line, when the block ends."""
    printed = io.StringIO()
    try:
        with redirect_stderr(printed), redirect_stdout(printed) if stdout else nullcontext():
            yield
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.debug("%s", line)
