"""Models on Ray Train: one `TorchTrainer` per model, the models fitted concurrently.

A `ModelPlan` says what one trainer trains: a PSAT member (a hypernetwork ResNet adversarially
trained for one norm), or a Table 1 baseline (a plain ResNet trained by NAT, AT, max, avg or
MSD). `member_loop` is the one train loop per worker (Ray's `train_loop_per_worker`); the same
loop serves the training job, the Tune sweep and the reproduction job. `fit_member` builds the
trainer and fits it; the jobs run one `fit_member` per plan in a driver thread.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
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


@dataclass(frozen=True)
class ModelPlan:
    """One model to train: its run name, training method (eq. 5-9), the norms it trains
    against, and its embedding dimension (None: a plain ResNet)."""

    name: str
    method: str
    norms: tuple[str, ...]
    embedding_dim: int | None

    @property
    def label(self) -> str:
        """The norm of a one-norm AT model, else the method (``MemberSpec.norm``)."""
        return self.norms[0] if self.method == "at" else self.method


def psat_members(
    job: JobConfig, embedding_dim: int | None = None, prefix: str = ""
) -> list[ModelPlan]:
    """The PSAT members of ``job``: one hypernetwork per norm of ``training.members`` (eq. 9)."""
    dim = embedding_dim or job.model.embedding_dim
    return [ModelPlan(f"{prefix}{norm}", "at", (norm,), dim) for norm in job.training.members]


def member_spec(job: JobConfig, plan: ModelPlan) -> MemberSpec:
    info = job.dataset
    return MemberSpec(
        arch=job.model.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        mean=tuple(info.mean),
        std=tuple(info.std),
        dataset=info.name,
        norm=plan.label,
        method=plan.method,
        embedding_dim=plan.embedding_dim,
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


class BoardReader:
    """The driver's side of a :class:`ProgressBoard`: each call returns the events posted since
    the previous call."""

    def __init__(self, board: ray.actor.ActorHandle) -> None:
        self.board, self.seen = board, 0

    def __call__(self) -> list[dict]:
        events = ray.get(self.board.since.remote(self.seen))
        self.seen += len(events)
        return events


def _load_shards(uris: list[str]) -> ImageArrays:
    parts = [read_arrays(uri) for uri in uris]
    return ImageArrays(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def member_loop(loop_config: dict[str, Any]) -> None:
    """Train one model of a plan (a PSAT member: eq. 9) on this worker's shard; report every
    epoch."""
    job = JobConfig.model_validate(loop_config["job"])
    plan = ModelPlan(**loop_config["plan"])
    manifest, board = loop_config["manifest"], loop_config["board"]
    torch.set_num_threads(job.resources.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.training.seed + rank)

    spec = member_spec(job, plan)
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
    train_attacks = job.attack_configs("train")
    inputs = training_inputs(plan.method, {n: train_attacks[n] for n in plan.norms})
    eval_attacks = make_attacks(job.attack_configs("validation"))

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
        start = {"member": plan.name, "kind": "start", "epoch": start_epoch, "pid": os.getpid()}
        board.post.remote(start)

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
                # the sweep's objective: own-norm accuracy for AT, else the trade-off
                metrics["robust"] = metrics[plan.label if plan.method == "at" else "trade_off"]
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
            board.post.remote({"member": plan.name, "kind": "epoch", **metrics})


def trainer_for(
    job: JobConfig,
    plan: ModelPlan,
    manifest: dict,
    board,
    run_name: str | None = None,
    callbacks=(),
) -> TorchTrainer:
    """The TorchTrainer of one model; relaunching with the same run name resumes it."""
    res = job.resources
    return TorchTrainer(
        member_loop,
        train_loop_config={
            "job": job.model_dump(),
            "plan": asdict(plan),
            "manifest": manifest,
            "board": board,
        },
        scaling_config=ScalingConfig(
            num_workers=res.workers_per_member,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=run_name or plan.name,
            storage_path=join(job.storage.resolved(), job.name),
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def fit_member(job: JobConfig, plan: ModelPlan, manifest: dict, board) -> dict:
    """Fit one model's TorchTrainer (blocking; the jobs run one per driver thread).

    A ValueError on a worker is a user fault (a damaged checkpoint or data file): it comes back
    as one ValueError naming the model, not as Ray Train's multi-line report.
    """
    try:
        result = trainer_for(job, plan, manifest, board).fit()
    except WorkerGroupError as err:
        faults = [e for e in err.worker_failures.values() if isinstance(e, ValueError)]
        if faults:
            raise ValueError(f"{plan.name}: {faults[0]}") from err
        raise
    return {
        "member": plan.name,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
        "path": result.path,
    }
