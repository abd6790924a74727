"""What reaches the terminal: the live status line, and libraries' prints kept for -v."""

from __future__ import annotations

import io
import logging
import sys

from orchestrator.runtime.terminal import StatusLine, duration, prints_to_log


def test_a_duration_reads_as_a_wall_time():
    assert [duration(s) for s in (7.4, 125, 3600, 3723.6)] == [
        "7s",
        "2m 05s",
        "1h 00m 00s",
        "1h 02m 04s",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_status_line_stays_below_the_printed_lines():
    out = Terminal()
    status = StatusLine(out, every=0)
    status.show("sweep: 1 running")
    status.print("trial 1 started")
    status.show("sweep: 2 running")
    status.close()
    clear = StatusLine.CLEAR
    assert out.getvalue() == (
        f"{clear}sweep: 1 running{clear}trial 1 started\nsweep: 1 running"
        f"{clear}sweep: 2 running{clear}"
    )


def test_several_live_lines_are_cleared_together():
    """One live line per evaluated row: printing above them, or new ones, clears them all."""
    out = Terminal()
    status = StatusLine(out, every=0)
    status.show("[linf] 256/1000 images\n[l2] 512/1000 images")
    status.print("[l1] 1000 images evaluated")
    status.close()
    clear, up = StatusLine.CLEAR, StatusLine.UP
    live = "[linf] 256/1000 images\n[l2] 512/1000 images"
    assert out.getvalue() == (
        f"{clear}{live}{clear}{up}[l1] 1000 images evaluated\n{live}{clear}{up}"
    )


def test_elsewhere_only_the_printed_lines():
    out = io.StringIO()  # a pipe: CI, a Ray job's log
    status = StatusLine(out, every=0)
    status.show("sweep: 1 running")
    status.print("trial 1 started")
    status.close()
    assert out.getvalue() == "trial 1 started\n"


def test_the_status_line_is_rewritten_at_most_once_per_interval():
    out = Terminal()
    status = StatusLine(out, every=3600)
    status.show("first")
    status.show("second")
    assert out.getvalue() == f"{StatusLine.CLEAR}first"


def test_library_prints_go_to_the_debug_log(caplog):
    with caplog.at_level(logging.DEBUG, "orchestrator.runtime.terminal"), prints_to_log(True):
        print("╭ a status table ╮")
        print("View detailed results here: /tmp/x", file=sys.stderr)
    assert [r.getMessage() for r in caplog.records] == [
        "╭ a status table ╮",
        "View detailed results here: /tmp/x",
    ]


def test_an_evaluation_shows_a_live_line_per_row_and_one_line_per_finished_row(monkeypatch):
    import torch

    from orchestrator.evaluation.rows import Row
    from orchestrator.evaluation.tasks import ChunkResult, RowProgress
    from psat_core.metrics import PerSampleResult

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)

    def chunk(robust: list[int]) -> ChunkResult:
        correct = {"clean": torch.ones(4, dtype=torch.bool), "linf/pgd": torch.tensor(robust) > 0}
        return ChunkResult(PerSampleResult(("linf/pgd",), correct, {}), 1, "cpu", 2.0)

    rows = [Row("member.linf", "H_linf", ("linf",)), Row("member.l2", "H_l2", ("l2",))]
    progress = RowProgress(rows, images=8, chunks=2, echo=print)
    progress.status.every = 0
    progress.ended("member.linf", chunk([1, 1, 0, 0]), running=1)
    assert out.getvalue().endswith("[member.linf] 4/8 images, 2 still robust, ~2s left")
    progress.ended("member.linf", chunk([1, 0, 0, 0]), running=0)
    progress.close()
    done = "[member.linf] 8 images evaluated, 3 robust to every attack; 4s of task time\n"
    assert done in out.getvalue() and out.getvalue().endswith(StatusLine.CLEAR)
