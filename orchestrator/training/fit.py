"""Fitting one model, Ray-free: what each Ray Train worker runs, and what a bare loop runs.

A `Fit` holds one model's training state on one worker (model, optimizer, schedule, training
method) for its `plan.ModelPlan`, and does one epoch, one validation, one checkpoint state at a
time. `trainer.train_loop` runs it under Ray Train; `train_in_process` runs it here (the
overhead benchmark's and the specialists benchmark's bare loop).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.config import JobConfig
from orchestrator.training.plan import OBJECTIVE, ModelPlan
from psat_core.accounting import trained_parameters
from psat_core.attacks import make_attacks
from psat_core.checkpoint import MemberSpec
from psat_core.data import ImageArrays
from psat_core.metrics import evaluate_robustness
from psat_core.steps import (
    MetaNoiseTraining,
    Method,
    make_optimizer,
    make_scheduler,
    param_groups,
    train_epoch,
    training_inputs,
    unwrap,
)


@dataclass
class Fit:
    """One model's training state on one worker. `model` may be DDP-wrapped; `net` is bare."""

    job: JobConfig
    plan: ModelPlan
    spec: MemberSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    method: Method  # what each update trains on (psat_core.steps.training_inputs)
    steps_per_epoch: int
    device: torch.device
    parameters: int  # Table 1's count (`accounting.trained_parameters`), once per fit

    @classmethod
    def build(
        cls,
        job: JobConfig,
        plan: ModelPlan,
        steps_per_epoch: int,
        device: torch.device,
        prepare: Callable[[nn.Module], nn.Module] = lambda model: model,
    ) -> Fit:
        """A fresh model on `device` (channels_last on GPUs), wrapped by `prepare` (Ray
        Train's DDP `prepare_model` on a worker), with its optimizer and per-step schedule."""
        spec = plan.spec(job)
        model = spec.build().to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        model = prepare(model)
        cfg = job.training
        settings = cfg.optimizer_settings(hypernetwork=plan.embedding_dim is not None)
        groups = param_groups(unwrap(model), cfg.optimizer.generator_out is not None)
        optimizer = make_optimizer(groups, *settings)
        scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * steps_per_epoch)
        attacks = job.attack_configs("train")
        method = training_inputs(
            plan.method,
            {norm: attacks[norm] for norm in plan.norms},
            in_channels=spec.in_channels,
            device=device,
        )
        return cls(
            job, plan, spec, model, optimizer, scheduler, method, steps_per_epoch, device,
            trained_parameters(spec),
        )  # fmt: skip

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)

    def train_epoch(self, data: ImageArrays, epoch: int) -> dict[str, float]:
        """One epoch of updates (`psat_core.steps.train_epoch`) and its timing."""
        cfg, started = self.job.training, time.time()
        metrics = train_epoch(
            self.model,
            data,
            self.optimizer,
            self.scheduler,
            self.method,
            batch_size=cfg.batch_size,
            steps=self.steps_per_epoch,
            seed=self.plan.training_seed(self.job) + epoch,
            augment=self.job.dataset.augment,
            amp=cfg.amp,
            attack_bn=cfg.attack_bn,
            device=self.device,
        )
        return metrics | {
            "epoch": epoch,
            EPOCHS_DONE: epoch + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "epoch_start": started,
            "epoch_end": time.time(),
            "params": self.parameters,
        }

    def validate(self, data: ImageArrays) -> dict[str, float]:
        """Robust accuracy on the validation slice under the job's validation attacks, and
        the sweep's objective."""
        attacks = make_attacks(self.job.attack_configs("validation"))
        x, y = data.to_float().to(self.device), data.labels.to(self.device)
        metrics = evaluate_robustness(self.net, x, y, attacks)
        return metrics | {OBJECTIVE: metrics[self.plan.objective]}

    def state(self, epoch: int) -> dict:
        """What a checkpoint holds to resume after `epoch` (AT_mng: its noise generator too)."""
        state = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "rng": torch.get_rng_state(),
        }
        if isinstance(self.method, MetaNoiseTraining):
            state[MetaNoiseTraining.CHECKPOINT_KEY] = self.method.state_dict()
        return state

    def restore(self, state: dict) -> int:
        """Load a checkpoint's state; returns the epoch to start from."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        if isinstance(self.method, MetaNoiseTraining):
            self.method.load_state_dict(state[MetaNoiseTraining.CHECKPOINT_KEY])
        return state["epoch"] + 1


def steps_per_epoch(shard_sizes: list[int], world: int, batch_size: int) -> int:
    """Updates per epoch: every worker takes as many as the smallest share allows (DDP
    all-reduces every step)."""
    smallest = min(sum(shard_sizes[rank::world]) for rank in range(world))
    return -(-smallest // batch_size)


# epochs trained so far, reported every epoch: ASHA's clock, which survives a trial's restart
EPOCHS_DONE = "epochs_done"
# the validation metric `training.checkpoint: best` maximises (robust overfitting: Rice et al.)
CHECKPOINT_METRIC = "trade_off"


def chosen(reports: Iterable[Mapping[str, Any]], rule: str) -> Mapping[str, Any]:
    """The epoch report whose checkpoint a model is used by: under ``rule`` "best" the one of
    highest validation trade-off, the later of a tie; under "last" the last epoch's. Reports
    without validation (other ranks) are not candidates."""
    candidates = [r for r in reports if CHECKPOINT_METRIC in r]
    if not candidates:
        raise ValueError("no validated epoch to choose a checkpoint from")
    if rule == "last":
        return max(candidates, key=lambda r: r["epoch"])
    return max(candidates, key=lambda r: (r[CHECKPOINT_METRIC], r["epoch"]))


def why_chosen(report: Mapping[str, Any], rule: str, epochs: int) -> str:
    """``"epoch 3/4: best validation trade_off 0.5312"``: what MLflow records of the choice."""
    epoch = f"epoch {int(report['epoch']) + 1}/{epochs}"
    if rule == "last":
        return f"{epoch}: the last (training.checkpoint: last)"
    return f"{epoch}: best validation {CHECKPOINT_METRIC} {report[CHECKPOINT_METRIC]:.4f}"


def train_in_process(
    job: JobConfig,
    plan: ModelPlan,
    train: ImageArrays,
    val: ImageArrays,
    device="cpu",
    on_epoch: Callable[[dict], object] = lambda metrics: None,
) -> Fit:
    """Train `plan`'s model in this process, validating every epoch as the workers do (each
    epoch's training and validation metrics go to `on_epoch`); returns the finished `Fit`
    (its `net` holds the chosen epoch's weights, `training.checkpoint`)."""
    torch.manual_seed(plan.training_seed(job))
    steps = steps_per_epoch([len(train)], 1, job.training.batch_size)
    fit = Fit.build(job, plan, steps, torch.device(device))
    reports: list[dict] = []
    for epoch in range(job.training.epochs):
        metrics = fit.train_epoch(train, epoch)
        validation = fit.validate(val)
        on_epoch(metrics | {f"val_{k}": v for k, v in validation.items()})
        reports.append({"epoch": epoch} | validation)
        if chosen(reports, job.training.checkpoint)["epoch"] == epoch:
            weights = copy.deepcopy(fit.net.state_dict())
    fit.net.load_state_dict(weights)
    return fit
