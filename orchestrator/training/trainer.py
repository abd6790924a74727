"""Models on Ray Train: one `TorchTrainer` per model, the models fitted concurrently.

`train_loop` is the one train loop per worker (Ray's `train_loop_per_worker`) for every
`ModelPlan` (a PSAT member or a Table 1 baseline): it runs a `fit.Fit` on the worker's data
shard, reports every epoch with a checkpoint, and posts progress to the job's `ProgressBoard`.
The same loop serves the training job, the Tune sweep and the reproduction job; `train_on_ray`
builds one model's trainer and fits it (the jobs run one per plan in a driver thread).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict
from functools import partial
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from orchestrator.config import JobConfig
from orchestrator.config.locations import checkpoint_location, join
from orchestrator.runtime.shards import read_arrays
from orchestrator.training.backend import SingleWorker
from orchestrator.training.fit import (
    CHECKPOINT_METRIC,
    EPOCHS_DONE,
    Fit,
    chosen,
    steps_per_epoch,
    why_chosen,
)
from orchestrator.training.plan import ModelPlan
from psat_core.checkpoint import load_state, save_member
from psat_core.data import ImageArrays


def train_loop(config: dict[str, Any]) -> None:
    """Fit one plan's model on this worker's shard; report and checkpoint every epoch."""
    job, plan = JobConfig.model_validate(config["job"]), ModelPlan(**config["plan"])
    last = config["last_epoch"]  # a sweep trial's ends at ASHA's max_t
    manifest, board = config["manifest"], config["board"]
    torch.set_num_threads(job.resources.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(plan.training_seed(job) + rank)
    steps = steps_per_epoch(manifest["shard_sizes"], world, job.training.batch_size)
    device, placement = worker_device()
    prepare = partial(ray.train.torch.prepare_model, move_to_device=device)  # DDP if several
    fit = Fit.build(job, plan, steps, device, prepare=prepare)
    start = _restore(fit)
    train = _load_shards(manifest["train"][rank::world])
    val = read_arrays(manifest["val"]) if rank == 0 else None
    started = {"model": plan.name, "kind": "start", "epoch": start, "pid": os.getpid()}
    _post(board, rank, started | placement)
    shards = [os.path.basename(uri) for uri in manifest["train"][rank::world]]
    for epoch in range(start, last):
        metrics = fit.train_epoch(train, epoch)
        metrics |= _report(fit, epoch, metrics, val)
        _post(board, rank, {"model": plan.name, "kind": "epoch", **metrics})
        if world > 1 and board is not None:  # DDP: what each rank trained on, and ended with
            board.post.remote({"model": plan.name, "kind": "rank", "epoch": epoch, "rank": rank,
                               "images": len(train), "shards": shards, "pid": os.getpid(),
                               "weights": weights_digest(fit.net)} | placement)  # fmt: skip
    if start >= last > 0:  # restarted with its budget spent: its last epoch, reported again
        _report(fit, last - 1, {"epoch": last - 1, EPOCHS_DONE: last}, val)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters: equal on every DDP rank after each step (BatchNorm's
    running statistics, buffers, follow each rank's own batches)."""
    digest = hashlib.sha256()
    for tensor in model.parameters():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def worker_device() -> tuple[torch.device, dict]:
    """This worker's device, from Ray's assignment, and where it is (for the model's run).

    The GPU Ray assigned (`ray.get_gpu_ids()`, as Ray Train indexes it in CUDA_VISIBLE_DEVICES)
    where CUDA sees it; the CPU where Ray assigned none, or where GPUs are only declared to
    Ray (CUDA is never initialized then).
    """
    gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
    placement = {"gpu_ids": ",".join(gpus), "node": ray.get_runtime_context().get_node_id()}
    device = torch.device("cpu")
    if gpus and torch.cuda.is_available():
        device = ray.train.torch.get_device()
    return device, placement | {"device": str(device)}


def _load_shards(uris: list[str]) -> ImageArrays:
    parts = [read_arrays(uri) for uri in uris]
    return ImageArrays(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _restore(fit: Fit) -> int:
    """Resume from Ray Train's latest checkpoint, if any; the epoch to start from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return fit.restore(load_state(directory, map_location=fit.device))


def _report(fit: Fit, epoch: int, metrics: dict, val: ImageArrays | None) -> dict:
    """Rank 0 validates and checkpoints; every rank reports (Ray Train needs all). Returns the
    validation metrics (none on other ranks)."""
    with tempfile.TemporaryDirectory() as directory:
        if val is None:
            ray.train.report(metrics)
            return {}
        validation = fit.validate(val)
        save_member(directory, fit.spec, fit.state(epoch))
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics | validation, checkpoint=checkpoint)
    return validation


def _post(board, rank: int, event: dict) -> None:
    if rank == 0 and board is not None:
        board.post.remote(event)


class ShardTrainer(TorchTrainer):
    """A TorchTrainer without the helper processes psat's runs do not need (each one a Python
    process importing Ray Train, per model):
    - no Ray Data `DatasetManager`: the workers read their own shards (`train_loop`);
    - no detached `PlacementGroupCleaner` when `fit()` runs in the job's driver. It removes a
      run's placement group if the controller dies before its creator does, which a Tune
      trial's controller can (ray-project/ray#54305); a driver's controllers die with the
      driver, and Ray removes a job's placement groups when it ends.
    """

    def _create_default_callbacks(self) -> list:
        unneeded = () if self.datasets else (DatasetsCallback,)
        if ray.get_runtime_context().get_actor_id() is None:  # the driver, not a Tune trial
            unneeded += (PlacementGroupCleanerCallback,)
        return [c for c in super()._create_default_callbacks() if not isinstance(c, unneeded)]


def train_run_name(job: JobConfig, plan: ModelPlan) -> str:
    """Ray Train's run of a model, `<job>-<model>` (the dashboard tells jobs apart). A run that
    psat 0.1 started under `<model>` alone keeps that name, so that it resumes from its
    checkpoints rather than starting again (since 2026-12-05)."""
    fs, path = pafs.FileSystem.from_uri(join(job.storage.resolved(), job.name, plan.name))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return plan.name
    return f"{job.name}-{plan.name}"


def trainer_for(
    job: JobConfig,
    plan: ModelPlan,
    manifest: dict,
    board,
    run_name: str | None = None,
    callbacks=(),
    last_epoch: int | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one model, its Ray Train run `train_run_name` unless `run_name` is
    given; relaunching with the same run name resumes it. It
    trains until `last_epoch` (a sweep trial's budget), by default `training.epochs`."""
    res = job.resources
    return ShardTrainer(
        train_loop,
        train_loop_config={
            "job": job.model_dump(),
            "plan": asdict(plan),
            "manifest": manifest,
            "board": board,
            "last_epoch": last_epoch or job.training.epochs,
        },
        torch_config=collective(res),
        scaling_config=ScalingConfig(
            num_workers=res.workers_per_member,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker}
            | ({"GPU": res.gpus} if res.gpus else {}),
        ),
        run_config=RunConfig(
            name=run_name or train_run_name(job, plan),
            storage_path=join(job.storage.resolved(), job.name),
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=checkpoints_kept(job),
            callbacks=list(callbacks),
        ),
    )


def checkpoints_kept(job: JobConfig) -> CheckpointConfig:
    """Two checkpoints kept besides the latest (which Ray always keeps: a restart resumes
    from it): under `training.checkpoint: best` the two of highest validation trade-off."""
    if job.training.checkpoint == "last":
        return CheckpointConfig(num_to_keep=2)
    return CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_METRIC, checkpoint_score_order="max"
    )


def collective(res) -> TorchConfig | SingleWorker:
    """DDP's process group for a model trained by several workers (`resources.ddp_backend`;
    auto: NCCL with GPUs, else gloo), none for a single worker."""
    if res.workers_per_member == 1:
        return SingleWorker()
    return TorchConfig(backend=None if res.ddp_backend == "auto" else res.ddp_backend)


def train_on_ray(job: JobConfig, plan: ModelPlan, manifest: dict, board) -> dict:
    """Fit one model's TorchTrainer (blocking; the jobs run one per driver thread).

    A ValueError on a worker is a user fault (a damaged checkpoint or data file): it comes back
    as one ValueError naming the model, not as Ray Train's multi-line report.
    """
    try:
        result = trainer_for(job, plan, manifest, board).fit()
    except (WorkerGroupError, ControllerError) as err:
        failures = (
            list(err.worker_failures.values())
            if isinstance(err, WorkerGroupError)
            else [err.controller_failure]
        )
        if faults := [e for e in failures if isinstance(e, ValueError)]:
            raise ValueError(f"{plan.name}: {faults[0]}") from err
        if faults := [e for e in failures if isinstance(e, OSError)]:  # pyarrow: the storage
            raise ConnectionError(
                f"{plan.name}: storage {job.storage.resolved()} failed: "
                f"{str(faults[0]).strip().splitlines()[-1]}; the checkpoints it holds are "
                "kept: relaunch the job once it answers to resume"
            ) from err
        raise
    rule, kept = job.training.checkpoint, result.best_checkpoints or []
    report = chosen([metrics for _, metrics in kept], rule)
    checkpoint = next(c for c, metrics in kept if metrics is report)
    return {
        "model": plan.name,
        "checkpoint": checkpoint_location(checkpoint.path, job.storage.resolved()),
        "metrics": dict(result.metrics or {}),
        "chosen": why_chosen(report, rule, job.training.epochs),
    }
