"""The training job: materialize data, fit the members concurrently, track them in MLflow.

validate config -> connect Ray -> Parquet shards -> MLflow parent + a run per model
-> one `train_on_ray` thread per model (concurrent TorchTrainers) -> follow progress
-> record checkpoints

`train_members` is the job (the PSAT members); `train_models` fits any `ModelPlan`s under an
open parent run, which the reproduction job uses for every model of Tables 1 and 3.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from ray._private.state import state as ray_state  # the cluster's ceiling, as Train reads it

from orchestrator.config import ConfigError, JobConfig
from orchestrator.fitting import ModelPlan, psat_members
from orchestrator.shards import join, materialize
from orchestrator.tracking import CHECKPOINT_TAG, PLAN_TAG, Tracker, ended_status
from orchestrator.trainers import BoardReader, ProgressBoard, train_on_ray

log = logging.getLogger(__name__)
PROGRESS_KEYS = ("loss", "clean", "linf", "l2", "l1", "trade_off")


LOCAL_CPU_OVERSUBSCRIPTION = 2  # a local Ray gets at most this many logical CPUs per core


def connect_ray(job: JobConfig, cpus_wanted: float, cpus_required: float | None = None) -> None:
    """Join the configured cluster (or $RAY_ADDRESS, set inside Ray Jobs), else start one here.

    A local Ray gets `cpus_wanted` logical CPUs (so that the members run concurrently even
    where there are fewer cores), but at least the cores and at most
    LOCAL_CPU_OVERSUBSCRIPTION per core; each worker keeps its torch threads to
    `resources.torch_threads`. What one model needs at once (`cpus_required`, default
    workers_per_member × cpus_per_worker, and its GPUs) must fit in what the Ray can ever
    offer: else a ConfigError naming the fields, before any Ray work.
    """
    required = _required(job, cpus_required)
    address = join_cluster(job)
    if address:
        # an autoscaling cluster's ceiling (what Ray Train checks too), else what it has now
        capacity = ray_state.get_max_resources_from_cluster_config() or ray.cluster_resources()
        _check_capacity(job, required, capacity, f"the Ray cluster at {address}")
        return
    if ray.is_initialized():  # a Ray this process started itself
        return
    check_local_capacity(job, cpus_required)
    cores = os.cpu_count() or 1
    most = LOCAL_CPU_OVERSUBSCRIPTION * cores
    # progress comes through the ProgressBoard; worker logs stay in Ray's log files.
    # address="local": a new Ray of our own, even if another one runs on this machine.
    # The dashboard stays: Train's PlacementGroupCleaner asks its state API whether the
    # controller lives, and without it every trainer's shutdown waits out a 12 s timeout.
    # One machine is never preempted: no PreemptionWatcher process per trainer.
    with sigterm_kept():
        ray.init(
            address="local",
            num_cpus=min(most, max(cores, math.ceil(cpus_wanted))),
            log_to_driver=False,
            logging_level=logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING,
            runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}},
        )


def _required(job: JobConfig, cpus_required: float | None) -> dict[str, float]:
    res = job.resources
    return {
        "CPU": cpus_required or res.workers_per_member * res.cpus_per_worker,
        "GPU": res.workers_per_member if res.use_gpu else 0,
    }


def check_local_capacity(job: JobConfig, cpus_required: float | None = None) -> None:
    """Where the job starts a Ray of its own (no cluster to join, none running here), what one
    model needs at once must fit this machine: else a ConfigError, before anything is
    written or started."""
    if job.resources.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    cores = os.cpu_count() or 1
    capacity = {"CPU": LOCAL_CPU_OVERSUBSCRIPTION * cores, "GPU": torch.cuda.device_count()}
    where = f"a local Ray on this machine's {cores} cores"
    _check_capacity(job, _required(job, cpus_required), capacity, where)


def prepare_job(job: JobConfig, cpus_wanted: float, cpus_required: float | None = None) -> dict:
    """What every job does first: join or start Ray (`connect_ray`) and write the data shards
    once (`orchestrator.shards.materialize`); returns the shards' manifest."""
    connect_ray(job, cpus_wanted, cpus_required)
    return materialize(job, data_uri(job), job.resources.workers_per_member)


def join_cluster(job: JobConfig) -> str | None:
    """Connect to `resources.address` (else $RAY_ADDRESS, set inside Ray Jobs) once; return it,
    or None where there is no cluster to join."""
    address = job.resources.address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        verbose = log.isEnabledFor(logging.DEBUG)
        # worker and actor output (Ray Train's own chatter) stays in Ray's logs unless -v;
        # ray.init resets Ray's logger to logging_level
        with sigterm_kept():
            ray.init(
                address=address,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.WARNING,
            )
    return address


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """`ray.init` installs its own SIGTERM handler; keep the process's (the CLI's
    `exit_on_sigterm`, which never exits half-way through an MLflow write)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _check_capacity(job: JobConfig, required: dict, capacity: dict, where: str) -> None:
    res = job.resources
    if required["CPU"] > capacity.get("CPU", 0):
        raise ConfigError(
            f"one model needs {required['CPU']:g} CPUs at once (resources.workers_per_member="
            f"{res.workers_per_member} x resources.cpus_per_worker={res.cpus_per_worker:g}); "
            f"{where} offers at most {capacity.get('CPU', 0):g}: lower them, or run on a "
            "larger cluster (resources.address, psat submit)"
        )
    if required["GPU"] > capacity.get("GPU", 0):
        raise ConfigError(
            f"resources.use_gpu asks for {required['GPU']} GPU(s) per model "
            f"(resources.workers_per_member); {where} offers {capacity.get('GPU', 0):g}: set "
            "resources.use_gpu=false, fewer workers, or run on a cluster with GPUs"
        )


def board_name(job: JobConfig) -> str:
    """The named actor holding a running job's progress events (models post, driver reads)."""
    return f"psat-progress-{job.name}"


def data_uri(job: JobConfig) -> str:
    return join(job.storage.resolved(), job.name, "data")


def train_members(job: JobConfig, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """The training job: fit the job's PSAT members concurrently under one MLflow parent run;
    return per member its final metrics, checkpoint and run id.

    Relaunching with the same `job.name` resumes unfinished members from their latest
    checkpoint and keeps logging into the same MLflow runs.
    """
    plans = psat_members(job)
    res = job.resources
    check_local_capacity(job)  # what can be refused before Ray starts is refused first
    tracker = Tracker(job)
    tracker.resumable("train")
    manifest = prepare_job(job, len(plans) * res.workers_per_member * res.cpus_per_worker)
    with tracker.job_run("train") as parent:
        results = train_models(job, plans, manifest, tracker, parent, len(plans), echo)
    echo(f"members finished; MLflow parent run {parent}")
    return results


def train_models(
    job: JobConfig,
    plans: list[ModelPlan],
    manifest: dict,
    tracker: Tracker,
    parent: str,
    concurrency: int,
    echo: Callable[[str], None],
) -> dict[str, dict]:
    """Fit every plan on Ray Train, at most `concurrency` at once, each logged to its own run
    nested under `parent` (ended here: FINISHED or FAILED); the first failure is raised once
    all have ended."""
    runs = {
        plan.name: tracker.child_run(
            parent,
            f"{job.name}-{plan.name}",
            "model",
            plan_params(tracker, plan),
            **{PLAN_TAG: plan.name},
        )
        for plan in plans
    }
    epochs = job.training.epochs
    results = {name: done for name, run in runs.items() if (done := _trained(tracker, run, epochs))}
    for name in results:
        echo(f"[{name}] already trained ({epochs}/{epochs} epochs)")
    plans = [plan for plan in plans if plan.name not in results]
    board = ProgressBoard.options(name=board_name(job)).remote()
    if plans:
        echo(f"training {', '.join(p.name for p in plans)}, {concurrency} at a time; MLflow "
             f"{tracker.uri}")  # fmt: skip
    errors: dict[str, BaseException] = {}
    new_events = BoardReader(board)

    def drain() -> None:
        for event in new_events():
            _on_event(tracker, runs, event, job.training.epochs, echo)

    # one driver thread per model blocks in TorchTrainer.fit(); Ray runs the workers
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="psat-trainer")
    try:
        pending = {pool.submit(train_on_ray, job, p, manifest, board): p.name for p in plans}
        while pending:
            done, _ = wait(pending, timeout=2.0)
            drain()
            for future in done:
                name = pending.pop(future)
                try:
                    results[name] = future.result()
                except Exception as err:  # the others train on; the job fails at the end
                    errors[name] = err
                    tracker.end(runs[name], "FAILED")
                    echo(f"[{name}] failed: {err}")
                else:
                    _record(tracker, parent, runs[name], results[name])
        drain()
    except BaseException as err:
        pool.shutdown(wait=False, cancel_futures=True)
        if ended_status(err) == "KILLED":
            ray.shutdown()  # the threads blocked in fit() return, so the process can exit
        raise  # the parent's run ends its nested runs still RUNNING
    finally:
        pool.shutdown(wait=False)
        if ray.is_initialized():  # an interrupted job has shut Ray down already
            ray.kill(board)
    if errors:
        raise next(iter(errors.values()))
    return results


def _trained(tracker: Tracker, run_id: str, epochs: int) -> dict | None:
    """The result of a model an earlier launch of the job finished (its run FINISHED, its final
    checkpoint recorded and still there), else None: a relaunch starts no trainer for it."""
    run = tracker.client.get_run(run_id)
    checkpoint = run.data.tags.get(CHECKPOINT_TAG)
    if run.info.status != "FINISHED" or not checkpoint:
        return None
    if "://" not in checkpoint and not Path(checkpoint, "member.json").is_file():
        return None  # removed since: train it again
    metrics = run.data.metrics | {"epoch": epochs - 1}  # the last epoch's, as a trainer's
    return {"model": run.data.tags[PLAN_TAG], "checkpoint": checkpoint, "metrics": metrics,
            "run_id": run_id}  # fmt: skip


def _record(tracker: Tracker, parent: str, run_id: str, result: dict) -> None:
    """A fitted model's checkpoint, on its run and its parent's; its run FINISHED."""
    tracker.client.set_tag(run_id, CHECKPOINT_TAG, result["checkpoint"])
    tracker.client.set_tag(parent, f"{CHECKPOINT_TAG}.{result['model']}", result["checkpoint"])
    tracker.end(run_id, "FINISHED")
    result["run_id"] = run_id


def plan_params(tracker: Tracker, plan: ModelPlan) -> dict[str, str]:
    """A model's run params: the job's, with what its plan sets itself (a Figure 2 member's
    embedding dimension, a baseline's method and norms, no embedding for a plain ResNet)."""
    own = {
        "model.embedding_dim": "none (plain ResNet)"
        if plan.embedding_dim is None
        else str(plan.embedding_dim),
        "plan.method": plan.method,
        "plan.norms": ",".join(plan.norms) or "none",
    }
    return tracker.params() | own


def _on_event(tracker: Tracker, runs: dict, event: dict, epochs: int, echo) -> None:
    name = event["model"]
    if event["kind"] == "start":
        tracker.client.log_metric(runs[name], "start_epoch", event["epoch"], step=event["epoch"])
        done = event["epoch"]  # epochs already trained; progress lines count from 1
        state = (
            "started from scratch" if done == 0
            else f"started resuming at epoch {done + 1}/{epochs}" if done < epochs
            else f"already trained ({done}/{epochs} epochs)"
        )  # fmt: skip
        echo(f"[{name}] {state} (pid {event['pid']})")
        return
    epoch = event["epoch"]
    metrics = {k: v for k, v in event.items() if k not in ("model", "kind", "epoch", "time")}
    tracker.log_metrics(runs[name], metrics, step=epoch)
    shown = "  ".join(f"{k} {event[k]:.3f}" for k in PROGRESS_KEYS if k in event)
    echo(f"[{name}] epoch {epoch + 1}/{epochs}  {shown}")
