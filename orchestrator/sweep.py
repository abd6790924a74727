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
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from matplotlib.figure import Figure
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from orchestrator.config import ConfigError, JobConfig, SweepRange, deep_merge
from orchestrator.fitting import OBJECTIVE, ModelPlan
from orchestrator.ray_session import check_ray
from orchestrator.shards import join
from orchestrator.tracking import Tracker, flatten
from orchestrator.trainers import trainer_for
from orchestrator.training import prepare_job
from psat_core.accounting import parameter_report

log = logging.getLogger(__name__)
ATTACK_PARAMS = ("steps", "step_size", "random_start")


def trial_job(job: JobConfig, params: dict[str, Any]) -> tuple[JobConfig, ModelPlan]:
    """The job config of one trial (its training settings) and the member it trains."""
    norm = params.get("norm", job.training.members[0])
    plan = ModelPlan(norm, "at", (norm,), params.get("embedding_dim", job.model.embedding_dim))
    changes: dict[str, Any] = {"training": {"members": [norm]}}
    if "lr" in params:
        changes["training"]["lr"] = params["lr"]
    optimizer = {"name": params["optimizer"]} if "optimizer" in params else {}
    for group in ("generator", "embeddings"):
        if f"{group}_lr" in params:
            optimizer[group] = {"lr": params[f"{group}_lr"]}
    if optimizer:
        changes["training"]["optimizer"] = optimizer
    attack = {k: params[k] for k in ATTACK_PARAMS if k in params}
    if attack:
        changes["attacks"] = {"train": {norm: attack}}
    trial = JobConfig.model_validate(deep_merge(job.model_dump(), changes))
    trial.attack_configs("train")  # validates the swept attack values
    return trial, plan


def sweep_trial(params: dict[str, Any], job_dict: dict, manifest: dict) -> None:
    """One Tune trial: fit one member's TorchTrainer; its epochs reach Tune via the callback."""
    job, plan = trial_job(JobConfig.model_validate(job_dict), params)
    trial_id = tune.get_context().get_trial_id()
    trainer = trainer_for(
        job,
        plan,
        manifest,
        board=None,
        run_name=f"trial-{trial_id}",
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def param_space(job: JobConfig) -> dict[str, Any]:
    space = {}
    for name, values in job.sweep.space.items():
        if isinstance(values, SweepRange):
            sample = tune.loguniform if values.log else tune.uniform
            space[name] = sample(values.low, values.high)
        elif job.sweep.search == "grid":
            space[name] = tune.grid_search(values)
        else:
            space[name] = tune.choice(values)
    space.setdefault("norm", tune.grid_search(job.training.members))
    return space


def check_space(job: JobConfig) -> None:
    """Every listed value must make a valid trial config (ranges are checked by their bounds)."""
    lists = {k: v for k, v in job.sweep.space.items() if isinstance(v, list)}
    ranges = {k: v.low for k, v in job.sweep.space.items() if isinstance(v, SweepRange)}
    for name, values in lists.items():
        for value in values:
            try:
                trial_job(job, ranges | {name: value})
            except ValueError as err:
                raise ConfigError(f"sweep.space.{name}: value {value!r}: {err}") from None


def _search(job: JobConfig):
    if job.sweep.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # optuna is optional
        raise ConfigError(
            "sweep.search: 'optuna' needs the optuna package (pip install optuna)"
        ) from err
    return OptunaSearch()


def _concurrency(job: JobConfig) -> int:
    if job.sweep.max_concurrent_trials:
        return job.sweep.max_concurrent_trials
    res = job.resources
    available = ray.cluster_resources()
    if res.use_gpu:
        return max(1, int(available.get("GPU", 0) // (res.workers_per_member * res.gpus)))
    per_trial = 1 + res.workers_per_member * res.cpus_per_worker
    return max(1, int(available.get("CPU", 1) // per_trial))


class MlflowTrials(tune.Callback):
    """Driver-side Tune callback: a nested MLflow run per trial under the sweep run.

    Tune pickles it with the experiment and unpickles it on restore, so it keeps only the
    job and the parent run id, and reconnects to MLflow lazily.
    """

    def __init__(self, job: JobConfig, parent: str):
        self.job, self.parent = job, parent
        self.runs: dict[str, str] = {}
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict:
        return {"job": self.job, "parent": self.parent, "runs": self.runs, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.job)
        return self._tracker

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            params = {k: str(v) for k, v in flatten(trial.config).items()}
            tags = {"psat.trial": trial.trial_id}
            name = f"trial-{trial.trial_id}"
            self.runs[trial.trial_id] = self.tracker.child_run(
                self.parent, name, "trial", params, **tags
            )
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)
        log.info("trial %s started: %s", trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k in _LOGGED}
        self.tracker.log_metrics(self._run(trial), metrics, step=int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.end(self._run(trial), "FINISHED")
        last = trial.last_result or {}
        log.info(
            "trial %s finished: %s %.3f after %d epochs",
            trial.trial_id,
            OBJECTIVE,
            last.get(OBJECTIVE, float("nan")),
            int(last.get("epoch", -1)) + 1,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.end(self._run(trial), "FAILED")
        log.warning("trial %s failed", trial.trial_id)


_LOGGED = (
    "loss",
    "train_accuracy",
    "clean",
    "linf",
    "l2",
    "l1",
    "max",
    "avg",
    "trade_off",
    OBJECTIVE,
    "params",
)


def run_sweep(job: JobConfig, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run (or continue) the job's sweep; return the best configuration per norm."""
    check_space(job)
    search = _search(job)
    res = job.resources
    trial = 1 + res.workers_per_member * res.cpus_per_worker  # the trial's driver + its workers
    check_ray(job, trial)  # what can be refused before Ray starts is refused first
    tracker = Tracker(job)
    tracker.resumable("sweep")
    manifest = prepare_job(job, 3 * trial, trial)
    storage = join(job.storage.resolved(), job.name)
    experiment = join(storage, "sweep")
    # the trial driver keeps Tune's default of 1 CPU and no GPU; its workers ask for the rest
    trainable = tune.with_parameters(sweep_trial, job_dict=job.model_dump(), manifest=manifest)
    with tracker.job_run("sweep") as parent:
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
                    scheduler=_scheduler(job),
                    search_alg=search,
                    num_samples=job.sweep.num_samples,
                    max_concurrent_trials=_concurrency(job),
                ),
                run_config=tune.RunConfig(
                    name="sweep", storage_path=storage, callbacks=[MlflowTrials(job, parent)]
                ),
            )
        grid = tuner.fit()
        rows = _rows(job, grid)
        if not rows:
            raise RuntimeError(f"the sweep in {experiment} produced no results; see Ray's logs")
        best = _best_per_norm(rows)
        _write_outputs(job, experiment, rows, best, tracker, parent)
    for norm, row in best.items():
        echo(f"best {norm}: {row['params']} -> {OBJECTIVE} {row['metrics'][OBJECTIVE]:.3f}")
    return best


def _scheduler(job: JobConfig) -> ASHAScheduler | None:
    if not job.sweep.asha:
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=job.sweep.max_t or job.training.epochs,
        grace_period=job.sweep.grace_period,
        reduction_factor=job.sweep.reduction_factor,
    )


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
        rows.append(
            {
                "trial_id": result.metrics.get("trial_id"),
                "norm": norm,
                "params": params,
                "metrics": {k: result.metrics[k] for k in _LOGGED if k in result.metrics},
                "epochs_run": int(result.metrics["epoch"]) + 1,
                "embedding_dim": dim,
                "member_params": report.member,
                "ensemble_params": report.aggregated,
                "param_share": report.aggregated / report.plain,
                "checkpoint": result.metrics.get(CHECKPOINT_PATH_KEY),
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
    figure = tradeoff_figure(rows, job.model.arch)
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


def tradeoff_figure(rows: list[dict], arch: str):
    """Figure 2: trade-off accuracy against the PSAT model's share of the plain ResNet's params."""
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for norm, group in itertools.groupby(
        sorted(rows, key=lambda r: r["norm"]), lambda r: r["norm"]
    ):
        group = sorted(group, key=lambda r: r["param_share"])
        xs = [100 * r["param_share"] for r in group]
        ys = [100 * r["metrics"].get("trade_off", float("nan")) for r in group]
        axis.plot(xs, ys, "o-", label=f"member {norm}")
        for r, x, y in zip(group, xs, ys, strict=True):
            axis.annotate(
                f"z={r['embedding_dim']}", (x, y), textcoords="offset points", xytext=(3, 3)
            )
    axis.set_xlabel(f"PSAT parameters (% of plain {arch})")
    axis.set_ylabel("trade-off accuracy (%)")
    axis.set_title("Trade-off accuracy vs parameter share (paper Fig. 2)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
