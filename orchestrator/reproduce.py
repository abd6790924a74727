"""The reproduction job: the paper's comparisons under one identical budget, checked harder.

    config -> `train_models` (Ray Train, MLflow; role "reproduce"): Table 1's baselines on the
       plain ResNet (NAT, AT_ℓ∞, AT_ℓ2, AT_ℓ1, AT_max, AT_avg, AT_msd, AT_mng), the PSAT members at
       `model.embedding_dim` and at every Figure 2 dimension, and Table 3's H_NAT
    -> `evaluation.tasks.evaluate_rows`: one Ray task per row, the suite
       `evaluation.suite` on every model (the gate and transfer attacks on every ensemble)
    -> Tables 1, 3, 4 and 6 (Markdown + PNG; Table 6: the AT_ℓp specialists aggregated
       directly, 3x the parameters), Figure 2 (PNG), the paper's claims checked against
       the numbers, results.json: into ``<reproduce.output>/<name>/`` and the MLflow run

Every model gets the same architecture, epochs and attacks (`training`, `attacks.train`); the
hypernetworks train with `training.optimizer`, the plain ResNets with `training.baselines`. Rows
are evaluated on the same images, seeded from `data.seed` and their models.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray

from orchestrator.config import JobConfig
from orchestrator.evaluation.claims import Claim
from orchestrator.evaluation.report import (
    HEADERS,
)
from orchestrator.evaluation.reproduction import _unique, write_report
from orchestrator.evaluation.rows import Row
from orchestrator.evaluation.tasks import RowResult, evaluate_rows
from orchestrator.runtime.capacity import check_ray, one_model
from orchestrator.runtime.ray_session import prepare_job
from orchestrator.runtime.tracking import REPRODUCE, Tracker
from orchestrator.training.driver import train_models
from orchestrator.training.plan import MULTI_NORM, ModelPlan, figure_dims, psat_members


def model_plans(job: JobConfig) -> list[ModelPlan]:
    """Every model the job trains, with one budget: Table 1's baselines, PSAT at each Figure 2
    dimension, and H_NAT (Table 3) at ``model.embedding_dim``; the costliest (one attack per
    norm and step) first, so that the last models to start are quick ones."""
    norms = tuple(job.training.members)
    plans = [ModelPlan(f"at_{method}", method, norms, None) for method in MULTI_NORM]
    plans += [ModelPlan(f"at_{norm}", "at", (norm,), None) for norm in norms]
    plans.append(ModelPlan("nat", "nat", (), None))
    for dim in figure_dims(job):
        plans += psat_members(job, dim, prefix=f"h{dim}_")
    if job.reproduce.nat_member:
        dim = job.model.embedding_dim
        plans.append(ModelPlan(f"h{dim}_nat", "nat", (), dim))
    return plans


def table_rows(job: JobConfig) -> dict[str, list[Row]]:
    """The rows of Tables 1, 3, 4 and 6 and Figure 2, by table; a row shared by tables (PSAT) is
    the same object, evaluated once."""
    norms = list(job.training.members)
    dim = job.model.embedding_dim
    members = psat_names(job, dim)
    psat = Row(f"psat_z{dim}", "PSAT", members, "lowest_entropy")
    baselines = [Row("nat", "NAT", ("nat",))]
    baselines += [
        Row(f"at_{m}", f"AT_{HEADERS[m] if m in norms else m}", (f"at_{m}",))
        for m in [*norms, *MULTI_NORM]
    ]
    hyper = [Row(f"h{dim}_{n}", f"H_{HEADERS[n]}", (f"h{dim}_{n}",)) for n in norms]
    table3 = hyper + [psat]
    if job.reproduce.nat_member:
        nat = f"h{dim}_nat"
        table3 = [Row(nat, "H_NAT", (nat,)), *table3]
        table3.append(Row(f"psat_z{dim}_nat", "+ H_NAT", (*members, nat), "lowest_entropy"))
    figure = [
        psat if z == dim else Row(f"psat_z{z}", f"PSAT z={z}", psat_names(job, z), psat.strategy)
        for z in figure_dims(job)
    ]
    specialists = tuple(f"at_{n}" for n in norms)  # Table 6: the AT_ℓp themselves aggregated
    direct = [
        Row("direct_lowest_entropy", "Direct aggregation", specialists, "lowest_entropy"),
        Row("direct_average", "Direct aggregation (average)", specialists, "average"),
    ]
    return {
        "table1": [*baselines, psat],
        "table3": table3,
        "table4": [psat, Row(f"psat_z{dim}_average", "PSAT average", members, "average")],
        "table6": [psat, *direct],
        "figure2": figure,
    }


def psat_names(job: JobConfig, dim: int) -> tuple[str, ...]:
    """The run names of PSAT's members at embedding dimension ``dim``: ``h<dim>_<norm>``."""
    return tuple(plan.name for plan in psat_members(job, dim, prefix=f"h{dim}_"))


# --------------------------------------------------------------------------- the paper's claims


# --------------------------------------------------------------------------- report


def _write_and_log(
    job: JobConfig,
    tables: dict[str, list[Row]],
    results: dict[str, RowResult],
    tracker: Tracker,
    run_id: str,
) -> tuple[Path, list[Claim]]:
    """The report into ``<reproduce.output>/<name>/`` (whole or not at all) and the run."""
    output = Path(job.reproduce.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.name}-", dir=output))
    try:
        claims = write_report(job, tables, results, staging)
        metrics = {
            f"{key}.{column}": value
            for key, result in results.items()
            for column, value in result.row.items()
        }
        metrics |= {f"{key}.parameters": result.parameters for key, result in results.items()}
        tracker.log_metrics(run_id, metrics, step=0)
        tracker.client.log_artifacts(run_id, str(staging), artifact_path=REPRODUCE)
        final = output / job.name
        shutil.rmtree(final, ignore_errors=True)
        staging.chmod(0o755)  # mkdtemp's 0700 was for the staging only
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, claims


# --------------------------------------------------------------------------- the job


def reproduce(job: JobConfig, echo: Callable[[str], None] = print) -> dict:
    """Train every model of the comparison, evaluate every row, write and log the report.

    Returns ``{"output": folder, "run_id": MLflow run, "claims": [...], "results": {...}}``.
    Relaunching with the same name resumes the training; evaluation and report are redone.
    """
    res = job.resources
    plans = model_plans(job)
    per_trainer = one_model(job, "reproduce")
    concurrency = job.reproduce.concurrent_trainers
    check_ray(job, per_trainer)  # what can be refused before Ray starts is
    tracker = Tracker(job)
    tracker.resumable(REPRODUCE)  # refused first
    manifest = prepare_job(job, per_trainer * (concurrency or 1))
    if concurrency is None:
        kind = "GPU" if res.use_gpu else "CPU"
        concurrency = max(1, int(ray.cluster_resources().get(kind, 0) // per_trainer))
    with tracker.job_run(REPRODUCE) as run_id:  # FAILED (KILLED on Ctrl-C) if any step fails
        trained = train_models(job, plans, manifest, tracker, run_id, concurrency, echo)
        checkpoints = {name: result["checkpoint"] for name, result in trained.items()}
        tables = table_rows(job)
        rows = sorted(_unique(tables), key=lambda row: -len(row.models))  # ensembles cost most
        echo(f"evaluating {len(rows)} rows (Ray tasks): {', '.join(r.label for r in rows)}")
        results = evaluate_rows(job, rows, checkpoints, manifest["eval"], echo)
        final, claims = _write_and_log(job, tables, results, tracker, run_id)
    for claim in claims:
        echo(claim.line().removeprefix("- ").replace("**", ""))
    echo(f"report: {final / 'report.md'}; MLflow run {run_id}")
    return {"output": str(final), "run_id": run_id, "claims": claims, "results": results}
