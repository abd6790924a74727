"""Evaluation at the cluster's scale (`orchestrator.evaluation.tasks.evaluate_rows`): every row
split into chunks, each a Ray task, on the session's shared Ray (12 declared CPUs)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from helpers import AGG_CHUNK, AGG_EVAL, locations

from orchestrator.evaluation.rows import aggregation_rows
from orchestrator.evaluation.tasks import evaluate_rows
from psat_core.ensemble import STRATEGIES

CHUNKS = 5 * AGG_EVAL // AGG_CHUNK  # 5 rows of 2 chunks


def chunk_attempts(ray, since: set[str]) -> list:
    """Every attempt of an `evaluate_chunk` task not in `since` (Ray's state API)."""
    from ray.util import state

    found = state.list_tasks(
        address=ray.get_runtime_context().gcs_address,
        filters=[("func_or_class_name", "=", "evaluate_chunk")],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )
    return [t for t in found if t.task_id not in since]


def kill_one_running_chunk(ray, since: set[str], killed: list, stop: threading.Event) -> None:
    """SIGKILL the worker process of the first chunk seen running (mid-attack)."""
    while not stop.is_set() and not killed:
        for attempt in chunk_attempts(ray, since):
            if attempt.state == "RUNNING" and attempt.worker_pid:
                os.kill(attempt.worker_pid, signal.SIGKILL)
                killed.append(attempt.task_id)
                return
        time.sleep(0.2)


@pytest.mark.slow
def test_chunks_of_every_row_run_at_once_survive_a_killed_worker_and_change_no_number(
    agg_rows, members, shared_ray, torch_threads
):
    """10 chunks (5 rows x 2), 4 at a time on 12 CPUs, one chunk's worker killed mid-attack:
    every row's per-image results are bit-identical to the same evaluation run chunk after
    chunk in this process (conftest's `agg_rows`); the killed chunk alone ran twice; chunks
    of several rows overlapped."""
    reference, eval_uri, job = agg_rows
    job = job.model_copy(update={"evaluation": job.evaluation.model_copy(
        update={"concurrent_chunks": 4})})  # fmt: skip
    checkpoints = locations(members)
    before = {t.task_id for t in chunk_attempts(shared_ray, set())}
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_one_running_chunk,
                              args=(shared_ray, before, killed, stop))  # fmt: skip
    killer.start()
    try:
        rows = aggregation_rows(checkpoints, STRATEGIES)
        on_ray = evaluate_rows(job, rows, checkpoints, eval_uri, echo=lambda line: None)
    finally:
        stop.set()
        killer.join()
    for key, result in on_ray.items():
        assert result.row == reference[key].row, key
        assert result.scores == reference[key].scores, key  # image by image
        assert result.samples == AGG_EVAL

    deadline = time.monotonic() + 30  # Ray records task events a second or so late
    while True:
        attempts = chunk_attempts(shared_ray, before)
        ended = [a for a in attempts if a.state == "FINISHED"]
        if len(ended) == CHUNKS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(killed) == 1 and len(ended) == CHUNKS
    runs = {}
    for attempt in attempts:
        runs.setdefault(attempt.task_id, []).append(attempt.attempt_number)
    assert sorted(runs[killed[0]]) == [0, 1]  # retried, alone
    assert all(tries == [0] for task, tries in runs.items() if task != killed[0])
    # chunks of several rows at once: the rows of the chunks running when each one started
    spans = [(a.start_time_ms, a.end_time_ms, a.name.split()[1]) for a in ended]
    at_once = [{row for s, e, row in spans if s <= t < e} for t, _, _ in spans]
    assert max(len(rows) for rows in at_once) > 1, spans
