"""Ray Tune sweeps over the embedding dimension and the PGD training hyper-parameters.

Each trial is a driver function that builds one member's `TorchTrainer` (the same `train_loop`
as the training job) and fits it; `TuneReportCallback` forwards every epoch's metrics to Tune.
The objective is the member's robust accuracy for its own norm on the validation slice
(`objective`), under the config's validation attacks. Running the same command again
continues an interrupted sweep with `Tuner.restore`; finished trials are not run again.

Outputs under `<storage>/<job>/sweep/`: results.parquet (one row per trial), best.json (the best
configuration per norm, with its checkpoint, read by the aggregation job) and tradeoff.png (the
paper's Figure 2), all logged to MLflow under one sweep run with a nested run per trial.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from math import nan
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from orchestrator.config import JobConfig
from orchestrator.config.locations import join
from orchestrator.evaluation.figures import tradeoff_figure
from orchestrator.runtime.capacity import check_ray, one_model
from orchestrator.runtime.ray_session import prepare_job
from orchestrator.runtime.terminal import prints_to_log
from orchestrator.runtime.tracking import SWEEP, Tracker
from orchestrator.training.fit import chosen
from orchestrator.training.plan import OBJECTIVE
from orchestrator.training.tune import (
    LOGGED_METRICS,
    MlflowTrials,
    TrialLines,
    asha_scheduler,
    check_space,
    param_space,
    search_algorithm,
    sweep_trial,
    trial_concurrency,
    trial_epochs,
    trial_job,
)
from psat_core.accounting import parameter_report

log = logging.getLogger(__name__)


def run_sweep(job: JobConfig, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run (or continue) the job's sweep; return the best configuration per norm."""
    check_space(job)
    search = search_algorithm(job)
    trial = one_model(job, "sweep")  # the trial's driver + its workers
    check_ray(job, trial)  # what can be refused before Ray starts is refused first
    tracker = Tracker(job)
    tracker.resumable(SWEEP)
    manifest = prepare_job(job, 3 * trial, trial)
    storage = join(job.storage.resolved(), job.name)
    experiment = join(storage, "sweep")
    # the trial driver keeps Tune's default of 1 CPU and no GPU; its workers ask for the rest
    trainable = tune.with_parameters(sweep_trial, job_dict=job.model_dump(), manifest=manifest)
    with tracker.job_run(SWEEP) as parent:
        if tune.Tuner.can_restore(experiment):
            echo(f"continuing the sweep in {experiment}")
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(job),
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE,
                    mode="max",
                    scheduler=asha_scheduler(job),
                    search_alg=search,
                    num_samples=job.sweep.num_samples,
                    max_concurrent_trials=trial_concurrency(job),
                ),
                run_config=tune.RunConfig(
                    name="sweep",
                    storage_path=storage,
                    callbacks=[MlflowTrials(job, parent), TrialLines(trial_epochs(job))],
                ),
            )
        # Tune's tables, trial boxes and hints: on the terminal with -v, else in the debug log
        with nullcontext() if log.isEnabledFor(logging.DEBUG) else prints_to_log(stdout=True):
            grid = tuner.fit()
        rows = _rows(job, grid)
        if not rows:
            raise RuntimeError(f"the sweep in {experiment} produced no results; see Ray's logs")
        best = _best_per_norm(rows)
        _write_outputs(job, experiment, rows, best, tracker, parent)
    for line in table_lines(rows, best):
        echo(line)
    return best


def table_lines(rows: list[dict], best: dict[str, dict]) -> list[str]:
    """The sweep's trials (the best of each norm starred), then the best per norm."""
    swept = sorted({k for row in rows for k in row["params"] if k != "norm"})
    header = ["trial", "norm", *swept, "epochs", "chosen", OBJECTIVE, "trade_off", "share"]
    winners = {id(row) for row in best.values()}
    table = [
        [
            row["trial_id"] + ("*" if id(row) in winners else ""),
            row["norm"],
            *(str(row["params"].get(k, "")) for k in swept),
            str(row["epochs_run"]),
            str(row["checkpoint_epoch"]),
            f"{row['metrics'][OBJECTIVE]:.3f}",
            f"{row['metrics'].get('trade_off', nan):.3f}",
            f"{100 * row['param_share']:.2f}%",
        ]
        for row in sorted(rows, key=lambda r: (r["norm"], r["trial_id"]))
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *table, strict=True)]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        for cells in [header, *table]
    ]
    for norm, row in best.items():
        score = row["metrics"][OBJECTIVE]
        lines.append(f"best {norm}: {row['params']} -> {OBJECTIVE} {score:.3f}")
    return lines


def _rows(job: JobConfig, grid) -> list[dict]:
    reports = {}
    rows = []
    for result in grid:
        if not result.metrics or OBJECTIVE not in result.metrics:
            continue
        params = dict(result.config)
        _, plan = trial_job(job, params)
        norm, dim = plan.norms[0], plan.embedding_dim
        if dim not in reports:
            reports[dim] = parameter_report(
                job.model.arch, job.dataset.num_classes, dim, 3, job.dataset.in_channels
            )
        report = reports[dim]
        history = result.metrics_dataframe.to_dict("records")
        pick = chosen([r for r in history if r.get(CHECKPOINT_PATH_KEY)], job.training.checkpoint)
        rows.append(
            {
                "trial_id": result.metrics.get("trial_id"),
                "norm": norm,
                "params": params,
                "metrics": {k: pick[k] for k in LOGGED_METRICS if k in pick},
                "epochs_run": int(result.metrics["epoch"]) + 1,
                "checkpoint_epoch": int(pick["epoch"]) + 1,
                "embedding_dim": dim,
                "member_params": report.member,
                "ensemble_params": report.aggregated,
                "param_share": report.aggregated / report.plain,
                "checkpoint": pick[CHECKPOINT_PATH_KEY],
            }
        )
    return rows


def _best_per_norm(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for norm, group in itertools.groupby(
        sorted(rows, key=lambda r: r["norm"]), lambda r: r["norm"]
    ):
        best[norm] = max(group, key=lambda r: r["metrics"][OBJECTIVE])
    return best


def _write_outputs(job, experiment: str, rows, best, tracker: Tracker, parent: str) -> None:
    table = pa.Table.from_pylist(
        [
            {k: v for k, v in row.items() if k not in ("params", "metrics")}
            | {f"config.{k}": str(v) for k, v in row["params"].items()}
            | row["metrics"]
            for row in rows
        ]
    )
    curves: dict[str, list] = {}
    for row in rows:
        point = (row["embedding_dim"], row["param_share"], row["metrics"].get("trade_off", nan))
        curves.setdefault(f"member {row['norm']}", []).append(point)
    figure = tradeoff_figure(dict(sorted(curves.items())), job.model.arch)
    fs, root = pafs.FileSystem.from_uri(experiment)
    with tempfile.TemporaryDirectory() as directory:
        local = Path(directory)
        pq.write_table(table, local / "results.parquet")
        (local / "best.json").write_text(json.dumps(best, indent=2, default=str))
        figure.savefig(local / "tradeoff.png", dpi=120)
        for path in local.iterdir():
            with fs.open_output_stream(join(root, path.name)) as stream:
                stream.write(path.read_bytes())
        tracker.client.log_artifacts(parent, directory)


def best_checkpoints(job: JobConfig) -> dict[str, str]:
    """`{norm: checkpoint}` of the best trial per norm, from the job's finished sweep."""
    fs, path = pafs.FileSystem.from_uri(
        join(job.storage.resolved(), job.name, "sweep", "best.json")
    )
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no sweep results for job {job.name!r}; run psat sweep")
    with fs.open_input_stream(path) as stream:
        best = json.loads(stream.read())
    return {norm: best[norm]["checkpoint"] for norm in job.training.members if norm in best}
