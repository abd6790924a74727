"""`psat evaluate`: Table 1's rows of a registered ensemble (both strategies) on a job's
eval split, loaded through `registry.pull` (digests and example answers verified)."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.config import JobConfig
from orchestrator.evaluation.report import STRATEGY_NAMES, table_lines
from orchestrator.evaluation.tasks import (
    evaluate_ensemble,
    progress_line,
    progress_to,
)
from orchestrator.runtime.capacity import one_model
from orchestrator.runtime.ray_session import prepare_job
from orchestrator.runtime.shards import read_arrays
from psat_core.ensemble import STRATEGIES
from psat_core.metrics import summarize


def evaluate_registered(
    job: JobConfig, uri: str, echo: Callable[[str], None] = print
) -> dict[str, dict[str, float]]:
    """Table-1 rows of a registered ensemble (both strategies) on the job's eval split."""
    from orchestrator.registry.pull import load_ensemble

    ensemble = load_ensemble(uri, tracking_uri=job.tracking.resolved_uri())
    row = one_model(job, "evaluate")
    manifest = prepare_job(job, row, row)
    data = read_arrays(manifest["eval"])
    rows = {}
    for strategy in STRATEGIES:
        ensemble.strategy = strategy
        progress = progress_to(lambda event: echo(progress_line(event)), strategy)
        images, labels = data.to_float(), data.labels
        rows[strategy] = summarize(evaluate_ensemble(job, ensemble, images, labels, progress)[0])
    echo(f"{uri} on {len(data)} {job.data.dataset} eval images")
    for line in table_lines({f"PSAT {STRATEGY_NAMES[s].lower()}": rows[s] for s in STRATEGIES}):
        echo(line)
    return rows
