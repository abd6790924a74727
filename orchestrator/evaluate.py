"""`psat evaluate`: Table 1's rows of a registered ensemble (both strategies) on a job's
eval split, on the cluster: the version is pulled (digests and example answers verified), its
members go to Ray's object store and every row's chunks are Ray tasks (`evaluate_rows`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from orchestrator.config import JobConfig
from orchestrator.evaluation.report import STRATEGY_NAMES, table_lines
from orchestrator.evaluation.rows import Row
from orchestrator.evaluation.tasks import evaluate_rows, packed
from orchestrator.runtime.capacity import one_model
from orchestrator.runtime.ray_session import prepare_job
from psat_core.ensemble import STRATEGIES


def evaluate_registered(
    job: JobConfig, uri: str, echo: Callable[[str], None] = print
) -> dict[str, dict[str, float]]:
    """Table-1 rows of a registered ensemble (both strategies) on the job's eval split."""
    from orchestrator.registry.pull import pull

    row = one_model(job, "evaluate")
    manifest = prepare_job(job, row, row)
    with tempfile.TemporaryDirectory(prefix="psat-evaluate-") as tmp:
        pulled = pull(uri, tmp, echo=lambda line: None, tracking_uri=job.tracking.resolved_uri())
        members = {name: packed(path) for name, path in pulled.member_dirs.items()}
    names = tuple(members)
    rows = [Row(s, f"PSAT {STRATEGY_NAMES[s].lower()}", names, s) for s in STRATEGIES]
    results = evaluate_rows(job, rows, members, manifest["eval"], echo)
    first = next(iter(results.values()))
    echo(f"{uri} on {first.samples} {job.data.dataset} eval images")
    for line in table_lines({row.label: results[row.key].row for row in rows}):
        echo(line)
    return {key: result.row for key, result in results.items()}
