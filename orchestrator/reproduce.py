"""The reproduction job: the paper's comparisons under one identical budget, checked harder.

    config -> `train_models` (Ray Train, MLflow; role "reproduce"), once per seed of
       `reproduce.seeds`: Table 1's baselines on the plain ResNet (NAT, AT_ℓ∞, AT_ℓ2, AT_ℓ1,
       AT_max, AT_avg, AT_msd, AT_mng), the PSAT members at `model.embedding_dim` and at every
       Figure 2 dimension, Table 3's H_NAT, Table 5's lightweight networks (SAT)
    -> `evaluation.tasks.evaluate_rows`: every row of every seed in chunks of Ray tasks, the
       suite `evaluation.suite` on every model (the gate and transfer attacks on every ensemble)
    -> Tables 1-6 (Markdown + PNG; Table 6: the AT_ℓp specialists aggregated directly, 3x the
       parameters), Figure 2 (PNG), the paper's claims checked against the numbers over seeds
       and images, results.json: into ``<reproduce.output>/<name>/`` and the MLflow run

Every model gets the same architecture, epochs and attacks (`training`, `attacks.train`); the
hypernetworks train with `training.optimizer`, the plain ResNets with `training.baselines`. Rows
are evaluated on the same images, seeded from `data.seed` and their models.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray

from orchestrator.config import JobConfig
from orchestrator.evaluation.claims import Claim
from orchestrator.evaluation.report import HEADERS
from orchestrator.evaluation.reproduction import Seeded, seed_suffix, unique_rows, write_report
from orchestrator.evaluation.rows import Row
from orchestrator.evaluation.tasks import evaluate_rows
from orchestrator.runtime.capacity import check_ray, one_model
from orchestrator.runtime.ray_session import prepare_job
from orchestrator.runtime.terminal import duration
from orchestrator.runtime.tracking import REPRODUCE, Tracker
from orchestrator.training.driver import train_models
from orchestrator.training.plan import MULTI_NORM, ModelPlan, figure_dims, psat_members


def model_plans(job: JobConfig) -> list[ModelPlan]:
    """Every model the job trains, with one budget, once per seed of ``reproduce.seeds``:
    Table 1's baselines, PSAT at each Figure 2 dimension, H_NAT (Table 3) at
    ``model.embedding_dim`` and Table 5's lightweight networks (SAT); the costliest (one attack
    per norm and step) first, so that the last models to start are quick ones."""
    norms = tuple(job.training.members)
    plans = [ModelPlan(f"at_{method}", method, norms, None) for method in MULTI_NORM]
    plans += [
        ModelPlan(f"sat_{arch}", "sat", norms, None, arch) for arch in job.reproduce.lightweight
    ]
    plans += [ModelPlan(f"at_{norm}", "at", (norm,), None) for norm in norms]
    plans.append(ModelPlan("nat", "nat", (), None))
    for dim in figure_dims(job):
        plans += psat_members(job, dim, prefix=f"h{dim}_")
    if job.reproduce.nat_member:
        dim = job.model.embedding_dim
        plans.append(ModelPlan(f"h{dim}_nat", "nat", (), dim))
    return [
        replace(plan, name=plan.name + seed_suffix(seed), seed=seed)
        for seed in range(job.reproduce.seeds)
        for plan in plans
    ]


def seeded(row: Row, seed: int) -> Row:
    """``row`` with its models trained with seed ``seed``."""
    suffix = seed_suffix(seed)
    return replace(row, key=row.key + suffix, models=tuple(m + suffix for m in row.models))


LIGHTWEIGHT_LABELS = {
    "mobilenet_v1": "MobileNetV1",
    "mobilenet_v3_small": "MobileNetV3-Small",
    "mobilenet_v3_large": "MobileNetV3-Large",
    "ghostnet": "GhostNet",
}


def table_rows(job: JobConfig) -> dict[str, list[Row]]:
    """The rows of Tables 1-6 and Figure 2 (Table 2's rows are Figure 2's), by table, for the
    first seed; a row shared by tables (PSAT) is the same object, evaluated once."""
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
    dims = figure_dims(job)
    figure = [
        psat if z == dim else Row(f"psat_z{z}", f"PSAT z={z}", psat_names(job, z), psat.strategy)
        for z in dims
    ]
    specialists = tuple(f"at_{n}" for n in norms)  # Table 6: the AT_ℓp themselves aggregated
    direct = [
        Row("direct_lowest_entropy", "Direct aggregation", specialists, "lowest_entropy"),
        Row("direct_average", "Direct aggregation (average)", specialists, "average"),
    ]
    lightweight = [
        Row(f"sat_{arch}", f"{LIGHTWEIGHT_LABELS[arch]} (SAT)", (f"sat_{arch}",))
        for arch in job.reproduce.lightweight
    ]
    table5 = {"table5": [*lightweight, psat]} if lightweight else {}
    return {
        "table1": [*baselines, psat],
        "table2": [replace(r, label=f"PSAT z={z}") for z, r in zip(dims, figure, strict=True)],
        "table3": table3,
        "table4": [psat, Row(f"psat_z{dim}_average", "PSAT average", members, "average")],
        **table5,
        "table6": [psat, *direct],
        "figure2": figure,
    }


def psat_names(job: JobConfig, dim: int) -> tuple[str, ...]:
    """The run names of PSAT's members at embedding dimension ``dim``: ``h<dim>_<norm>``."""
    return tuple(plan.name for plan in psat_members(job, dim, prefix=f"h{dim}_"))


# --------------------------------------------------------------------------- report


def _write_and_log(
    job: JobConfig,
    tables: dict[str, list[Row]],
    results: dict[str, Seeded],
    tracker: Tracker,
    run_id: str,
    wall: dict[str, float],
) -> tuple[Path, list[Claim]]:
    """The report into ``<reproduce.output>/<name>/`` (whole or not at all) and the run."""
    output = Path(job.reproduce.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.name}-", dir=output))
    try:
        claims = write_report(job, tables, results, staging, wall)
        metrics = {  # each seed's row under its own key, as results.json has them
            f"{key}{seed_suffix(seed)}.{column}": value
            for key, rows in results.items()
            for seed, result in enumerate(rows.seeds)
            for column, value in result.row.items()
        }
        metrics |= {f"{key}.parameters": result.parameters for key, result in results.items()}
        metrics |= {f"wall_seconds.{phase}": seconds for phase, seconds in wall.items()}
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

    Returns ``{"output": folder, "run_id": MLflow run, "claims": [...], "results": {row key:
    Seeded}}``.
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
        start = time.monotonic()
        trained = train_models(job, plans, manifest, tracker, run_id, concurrency, echo)
        wall = {"training": time.monotonic() - start}
        echo(f"trained {len(plans)} models in {duration(wall['training'])}")
        checkpoints = {name: result["checkpoint"] for name, result in trained.items()}
        tables = table_rows(job)
        rows = sorted(unique_rows(tables), key=lambda row: -len(row.models))  # ensembles first
        seeds = range(job.reproduce.seeds)
        start = time.monotonic()
        times = f"{len(seeds)} seed{'s' * (len(seeds) > 1)}"
        echo(f"evaluating {len(rows)} rows x {times} (Ray tasks): "
             f"{', '.join(r.label for r in rows)}")  # fmt: skip
        evaluated = evaluate_rows(
            job,
            [seeded(row, s) for s in seeds for row in rows],
            checkpoints,
            manifest["eval"],
            echo,
        )
        wall["evaluation"] = time.monotonic() - start
        echo(f"evaluated {len(rows) * len(seeds)} rows in {duration(wall['evaluation'])}")
        results = {row.key: Seeded([evaluated[seeded(row, s).key] for s in seeds]) for row in rows}
        final, claims = _write_and_log(job, tables, results, tracker, run_id, wall)
    for claim in claims:
        echo(claim.line().removeprefix("- ").replace("**", ""))
    echo(f"report: {final / 'report.md'}; MLflow run {run_id}")
    return {"output": str(final), "run_id": run_id, "claims": claims, "results": results}
