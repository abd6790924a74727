"""Driving models on Ray Train from the job's process: one `train_on_ray` thread per model
(concurrent TorchTrainers, at most `concurrency` at once), each model's MLflow run nested under
the job's, the progress board's events turned into metrics and printed lines, checkpoints
recorded. `train_members` (the PSAT members) and `reproduce` (every model of Tables 1 and 3)
both train through `train_models`; a relaunch skips the models an earlier launch finished.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path

import ray
from mlflow.entities import RunTag

from orchestrator.config import JobConfig
from orchestrator.config.locations import is_uri
from orchestrator.runtime.progress import BoardReader, board_here
from orchestrator.runtime.ray_session import board_name
from orchestrator.runtime.tracking import (
    CHECKPOINT_TAG,
    CHOSEN_TAG,
    MODEL,
    PLACEMENT_TAGS,
    PLAN_TAG,
    Tracker,
)
from orchestrator.training.plan import ModelPlan
from orchestrator.training.trainer import train_on_ray

PROGRESS_KEYS = ("loss", "clean", "linf", "l2", "l1", "trade_off")
log = logging.getLogger(__name__)


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
    runs = _model_runs(job, plans, tracker, parent)
    epochs = job.training.epochs
    results = {name: done for name, run in runs.items() if (done := _trained(tracker, run, epochs))}
    for name in results:
        echo(f"[{name}] already trained ({epochs}/{epochs} epochs)")
    plans = [plan for plan in plans if plan.name not in results]
    board = board_here(board_name(job))
    if plans:
        echo(f"training {', '.join(p.name for p in plans)}, {concurrency} at a time; MLflow "
             f"{tracker.uri}")  # fmt: skip
    errors: dict[str, BaseException] = {}
    new_events = BoardReader(board)
    started: dict[str, dict] = {}

    def drain() -> None:
        for event in new_events():
            _on_event(tracker, runs, started, event, job.training.epochs, echo)

    # one driver thread per model blocks in TorchTrainer.fit(); Ray runs the workers
    slots = threading.Semaphore(concurrency)
    pending = {
        _in_daemon_thread(slots, train_on_ray, job, plan, manifest, board): plan.name
        for plan in plans
    }
    try:
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
                    echo(f"[{name}] uses the checkpoint of {results[name]['chosen']}")
        drain()
    except BaseException:
        for future in pending:  # those not started yet never start
            future.cancel()
        raise  # the parent's run ends its nested runs still RUNNING
    finally:
        ray.kill(board)
    if errors:
        raise next(iter(errors.values()))
    return results


def _model_runs(
    job: JobConfig, plans: list[ModelPlan], tracker: Tracker, parent: str
) -> dict[str, str]:
    """Each plan's MLflow run, nested under `parent`: found again on a relaunch, else new."""
    return {
        plan.name: tracker.child_run(
            parent,
            f"{job.name}-{plan.name}",
            MODEL,
            plan_params(tracker, plan),
            **{PLAN_TAG: plan.name},
        )
        for plan in plans
    }


def _in_daemon_thread(slots: threading.Semaphore, fn: Callable, *args) -> Future:
    """``fn(*args)`` in a daemon thread once one of `slots` is free. A job that ends early
    (Ctrl-C, SIGTERM, a failure) exits without waiting for threads blocked in Ray Train's
    fit(), which a thread pool would join at exit; its trainers end with its Ray session."""
    future: Future = Future()

    def run() -> None:
        with slots:
            if not future.set_running_or_notify_cancel():
                return  # cancelled before it started
            try:
                future.set_result(fn(*args))
            except BaseException as err:
                future.set_exception(err)

    threading.Thread(target=run, name="psat-trainer", daemon=True).start()
    return future


def _trained(tracker: Tracker, run_id: str, epochs: int) -> dict | None:
    """The result of a model an earlier launch of the job finished (its run FINISHED, its final
    checkpoint recorded and still there), else None: a relaunch starts no trainer for it."""
    run = tracker.client.get_run(run_id)
    checkpoint = run.data.tags.get(CHECKPOINT_TAG)
    if run.info.status != "FINISHED" or not checkpoint:
        return None
    if not is_uri(checkpoint) and not Path(checkpoint, "member.json").is_file():
        return None  # removed since: train it again
    metrics = run.data.metrics | {"epoch": epochs - 1}  # the last epoch's, as a trainer's
    return {"model": run.data.tags[PLAN_TAG], "checkpoint": checkpoint, "metrics": metrics,
            "chosen": run.data.tags.get(CHOSEN_TAG, ""), "run_id": run_id}  # fmt: skip


def _record(tracker: Tracker, parent: str, run_id: str, result: dict) -> None:
    """A fitted model's chosen checkpoint (and why it, `training.checkpoint`), on its run and
    its parent's; its run FINISHED."""
    tracker.client.set_tag(run_id, CHECKPOINT_TAG, result["checkpoint"])
    tracker.client.set_tag(run_id, CHOSEN_TAG, result["chosen"])
    tracker.client.set_tag(parent, f"{CHECKPOINT_TAG}.{result['model']}", result["checkpoint"])
    tracker.end(run_id, "FINISHED")
    result["run_id"] = run_id


def plan_params(tracker: Tracker, plan: ModelPlan) -> dict[str, str]:
    """A model's run params: the job's, with what its plan sets itself (a Figure 2 member's
    embedding dimension, a baseline's method and norms, no embedding for a plain network, a
    lightweight network's architecture, a seed's training seed)."""
    own = {
        "model.embedding_dim": "none (plain ResNet)"
        if plan.embedding_dim is None
        else str(plan.embedding_dim),
        "plan.method": plan.method,
        "plan.norms": ",".join(plan.norms) or "none",
    }
    if plan.arch is not None:
        own |= {"model.arch": plan.arch, "model.embedding_dim": "none (plain network)"}
    if plan.seed:
        own["training.seed"] = str(plan.training_seed(tracker.job))
    return tracker.params() | own


def _on_event(tracker: Tracker, runs: dict, started: dict, event: dict, epochs: int, echo) -> None:
    """One progress event: a model's start (where, from which epoch; a restart says what it
    lost) or epoch, into its MLflow run and one printed line. `started`: model -> its last
    start event in this launch."""
    name = event["model"]
    if event["kind"] == "start":
        tracker.client.log_metric(runs[name], "start_epoch", event["epoch"], step=event["epoch"])
        done = event["epoch"]  # epochs already trained; progress lines count from 1
        state = (
            "started from scratch" if done == 0
            else f"started resuming at epoch {done + 1}/{epochs}" if done < epochs
            else f"already trained ({done}/{epochs} epochs)"
        )  # fmt: skip
        if (lost := started.get(name)) is not None:  # Ray Train restarted its worker group
            state = f"{state} from its checkpoint" if done else "started again from scratch"
            state += f", after losing its worker (pid {lost['pid']} on node {lost['node'][:8]}),"
        started[name] = event
        placement = {f"psat.{key}": event[key] for key in PLACEMENT_TAGS}
        tracker.client.log_batch(runs[name], tags=[RunTag(k, v) for k, v in placement.items()])
        gpus = f", Ray GPU {event['gpu_ids']}" if event["gpu_ids"] else ""
        where = f"{event['device']}{gpus}, node {event['node'][:8]}"
        echo(f"[{name}] {state} on {where} (pid {event['pid']})")
        return
    epoch = event["epoch"]
    if event["kind"] == "rank":  # a DDP rank's shard and weights, for `psat -v`
        log.debug("[%s] epoch %d rank %d (pid %d, node %s): %d images from %s, weights %s", name,
                  epoch + 1, event["rank"], event["pid"], event["node"][:8], event["images"],
                  ",".join(event["shards"]), event["weights"][:16])  # fmt: skip
        return
    metrics = {k: v for k, v in event.items() if k not in ("model", "kind", "epoch", "time")}
    tracker.log_metrics(runs[name], metrics, step=epoch)
    shown = "  ".join(f"{k} {event[k]:.3f}" for k in PROGRESS_KEYS if k in event)
    echo(f"[{name}] epoch {epoch + 1}/{epochs}  {shown}")
