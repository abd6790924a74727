"""Ray Tune's side of a sweep: each trial's config and trainer, the search space, the search
algorithm, ASHA, the trials' concurrency, a nested MLflow run per trial (`MlflowTrials`) and
a line per trial as it starts and ends, under a live status line on a terminal (`TrialLines`).

Each trial is a driver function that builds one member's `TorchTrainer` (the same `train_loop`
as the training job) and fits it; `TuneReportCallback` forwards every epoch's metrics to Tune.
The objective is the member's robust accuracy for its own norm on the validation slice
(`objective`), under the config's validation attacks. The sweep job is `orchestrator.sweep`.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from orchestrator.config import ConfigError, JobConfig, SweepRange, deep_merge
from orchestrator.runtime.terminal import StatusLine, duration
from orchestrator.runtime.tracking import TRIAL, TRIAL_TAG, Tracker, flatten
from orchestrator.training.fit import EPOCHS_DONE
from orchestrator.training.plan import OBJECTIVE, ModelPlan
from orchestrator.training.trainer import trainer_for

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
        last_epoch=trial_epochs(job),
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


def search_algorithm(job: JobConfig):
    if job.sweep.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # optuna is optional
        raise ConfigError(
            "sweep.search: 'optuna' needs the optuna package (pip install optuna)"
        ) from err
    return OptunaSearch()


def trial_concurrency(job: JobConfig) -> int:
    if job.sweep.max_concurrent_trials:
        return job.sweep.max_concurrent_trials
    res = job.resources
    available = ray.cluster_resources()
    if res.use_gpu:
        return max(1, int(available.get("GPU", 0) // res.gpus_per_model))
    per_trial = 1 + res.cpus_per_model
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
            tags = {TRIAL_TAG: trial.trial_id}
            name = f"trial-{trial.trial_id}"
            self.runs[trial.trial_id] = self.tracker.child_run(
                self.parent, name, TRIAL, params, **tags
            )
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k in LOGGED_METRICS}
        self.tracker.log_metrics(self._run(trial), metrics, step=int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.end(self._run(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.end(self._run(trial), "FAILED")


class TrialLines(tune.Callback):
    """What a person follows of a sweep: a line per trial as it starts (its configuration) and
    as it ends (epochs trained, objective, trade-off; ASHA's early stops say so), and on a
    terminal a live line: trials running, ended and pending, the best objective, the time."""

    def __init__(self, epochs: int):
        self.epochs, self.numbers, self.started = epochs, {}, time.monotonic()
        self.status = StatusLine()

    def __getstate__(self) -> dict:  # pickled with the experiment: no terminal in it
        return {"epochs": self.epochs, "numbers": self.numbers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["epochs"])
        self.numbers = state["numbers"]

    def get_state(self) -> dict:  # Tune's checkpoint of the experiment: trials keep numbers
        return {"numbers": self.numbers}

    def set_state(self, state: dict) -> None:
        self.numbers = state["numbers"]

    def _name(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {number} ({trial.trial_id})"

    def on_trial_start(self, iteration, trials, trial, **info):
        config = ", ".join(f"{k}={v}" for k, v in flatten(trial.config).items())
        self.status.print(f"{self._name(trial)} started: {config}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        done = int(last.get(EPOCHS_DONE, 0))
        how = "stopped by ASHA" if done < self.epochs else "ended"
        self.status.print(
            f"{self._name(trial)} {how} after {done}/{self.epochs} epochs: "
            f"{OBJECTIVE} {last.get(OBJECTIVE, float('nan')):.3f}, "
            f"trade_off {last.get('trade_off', float('nan')):.3f}"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.status.print(f"{self._name(trial)} failed (Ray's logs: psat sweep -v)")

    def on_step_end(self, iteration, trials, **info):
        counts = {"RUNNING": 0, "TERMINATED": 0, "PENDING": 0}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        scores = [t.last_result.get(OBJECTIVE) for t in trials if t.last_result]
        best = max((s for s in scores if s is not None), default=None)
        self.status.show(
            f"sweep: {counts['RUNNING']} running, {counts['TERMINATED']} ended, "
            f"{counts['PENDING']} pending; best {OBJECTIVE} "
            f"{'-' if best is None else f'{best:.3f}'}; {duration(time.monotonic() - self.started)}"
        )

    def on_experiment_end(self, trials, **info):
        self.status.close()


LOGGED_METRICS = (
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


def trial_epochs(job: JobConfig) -> int:
    """The most epochs a trial trains: ASHA's `max_t` (a cap, never more than the schedule's
    `training.epochs`), else all of them."""
    if job.sweep.asha and job.sweep.max_t:
        return min(job.sweep.max_t, job.training.epochs)
    return job.training.epochs


def asha_scheduler(job: JobConfig) -> ASHAScheduler | None:
    """ASHA counting the epochs a trial has trained (`EPOCHS_DONE`), not Tune's iterations:
    a trial restarted by `Tuner.restore` resumes its Ray Train run at its checkpoint, while
    Tune counts its iterations from 0 again, so an iteration budget would overrun `max_t`."""
    if not job.sweep.asha:
        return None
    return ASHAScheduler(
        time_attr=EPOCHS_DONE,
        max_t=trial_epochs(job),
        grace_period=job.sweep.grace_period,
        reduction_factor=job.sweep.reduction_factor,
    )
