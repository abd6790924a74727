"""PSAT members on Ray Train: one `TorchTrainer` per norm, the members fitted concurrently.

`member_loop` is the one train loop per worker (Ray's `train_loop_per_worker`); the same loop
serves the training job and the Tune sweep. `fit_member` builds the trainer and fits it; the
training job runs one `fit_member` per norm in its own driver thread and follows their progress.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.config import JobConfig
from orchestrator.shards import join, read_arrays
from psat_core.attacks import make_attacks
from psat_core.checkpoint import MemberSpec, load_state, save_member
from psat_core.data import ImageArrays
from psat_core.metrics import evaluate_robustness
from psat_core.models import count_parameters
from psat_core.train import (
    make_optimizer,
    make_scheduler,
    train_epoch,
    training_inputs,
    unwrap,
)


def member_spec(job: JobConfig, norm: str) -> MemberSpec:
    info = job.dataset
    return MemberSpec(
        arch=job.model.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        mean=tuple(info.mean),
        std=tuple(info.std),
        dataset=info.name,
        norm=norm,
        method="at",
        embedding_dim=job.model.embedding_dim,
        reduction=job.model.reduction,
    )


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where members' rank-0 workers post events; the driver reads them to log and print."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def post(self, event: dict) -> None:
        self.events.append(dict(event, time=time.time()))

    def since(self, index: int) -> list[dict]:
        return self.events[index:]


def _load_shards(uris: list[str]) -> ImageArrays:
    parts = [read_arrays(uri) for uri in uris]
    return ImageArrays(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def member_loop(loop_config: dict[str, Any]) -> None:
    """Adversarially train one PSAT member (eq. 9) on this worker's shard; report every epoch."""
    job = JobConfig.model_validate(loop_config["job"])
    norm, manifest, board = loop_config["norm"], loop_config["manifest"], loop_config["board"]
    torch.set_num_threads(job.resources.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.training.seed + rank)

    spec = member_spec(job, norm)
    model = spec.build()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    net = unwrap(model)
    shards = manifest["train"]
    train = _load_shards(shards[rank::world])
    val = read_arrays(manifest["val"]) if rank == 0 else None
    # every worker takes the same number of steps (DDP all-reduces every step)
    smallest = min(sum(manifest["shard_sizes"][r::world]) for r in range(world))
    steps_per_epoch = -(-smallest // job.training.batch_size)
    cfg = job.training
    optimizer = make_optimizer(net.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * steps_per_epoch)
    inputs = training_inputs("at", {norm: job.attack_configs("train")[norm]})
    eval_attacks = make_attacks(job.attack_configs("eval"))

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory, map_location=device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        start_epoch = state["epoch"] + 1
    if rank == 0 and board is not None:
        board.post.remote({"norm": norm, "kind": "start", "epoch": start_epoch, "pid": os.getpid()})

    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        metrics = train_epoch(
            model,
            train,
            optimizer,
            scheduler,
            inputs,
            batch_size=cfg.batch_size,
            steps=steps_per_epoch,
            seed=cfg.seed + epoch,
            augment=job.dataset.augment,
            amp=cfg.amp,
            device=device,
        )
        metrics |= {
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            "epoch_start": started,
            "epoch_end": time.time(),
            "params": count_parameters(net),
        }
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                x_val = val.to_float().to(device)
                metrics |= evaluate_robustness(net, x_val, val.labels.to(device), eval_attacks)
                metrics["robust"] = metrics[norm]  # own-norm accuracy: the sweep's objective
                state = {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "rng": torch.get_rng_state(),
                }
                save_member(directory, spec, state)
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if rank == 0 and board is not None:
            board.post.remote({"norm": norm, "kind": "epoch", **metrics})


def trainer_for(
    job: JobConfig, norm: str, manifest: dict, board, run_name: str | None = None, callbacks=()
) -> TorchTrainer:
    """The TorchTrainer of one member; relaunching with the same run name resumes it."""
    res = job.resources
    return TorchTrainer(
        member_loop,
        train_loop_config={
            "job": job.model_dump(),
            "norm": norm,
            "manifest": manifest,
            "board": board,
        },
        scaling_config=ScalingConfig(
            num_workers=res.workers_per_member,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=run_name or norm,
            storage_path=join(job.storage.resolved(), job.name),
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def fit_member(job: JobConfig, norm: str, manifest: dict, board) -> dict:
    """Fit one member's TorchTrainer (blocking; the training job runs one per thread)."""
    result = trainer_for(job, norm, manifest, board).fit()
    return {
        "norm": norm,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
        "path": result.path,
    }
