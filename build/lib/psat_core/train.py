"""One adversarial training step for every method of Table 1.

    nat  natural training
    at   adversarial training for one norm (a PSAT member, eq. 9; AT_linf / AT_l2 / AT_l1)
    max  worst case over the norms (eq. 5)
    avg  mean loss over the norms (eq. 6)
    msd  multi steepest descent (eq. 7)

A hypernetwork member generates its conv weights once per parameter update: the attack
iterations reuse them detached, and the training forward uses the same tensors with their graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psat_core.attacks import MSD, PGD, AttackConfig, WorstCase, adversarial_examples
from psat_core.data import ImageArrays, random_crop_flip
from psat_core.models import HyperResNet

METHODS = ("nat", "at", "max", "avg", "msd")
SCHEDULES = ("cosine", "multistep", "constant")

# (model, x, y) -> the inputs the loss is averaged over
TrainingInputs = Callable[[nn.Module, Tensor, Tensor], list[Tensor]]


def training_inputs(method: str, attacks: Mapping[str, AttackConfig]) -> TrainingInputs:
    """The inputs a method trains on, built from its attack configs (keyed by norm)."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "nat":
        return lambda model, x, y: [x]
    if not attacks:
        raise ValueError(f"method {method!r} needs at least one attack config")
    pgds = {norm: PGD.from_config(cfg) for norm, cfg in attacks.items()}
    if method == "at":
        if len(pgds) != 1:
            raise ValueError(f"method 'at' trains against one norm, got {sorted(pgds)}")
        (pgd,) = pgds.values()
        return lambda model, x, y: [pgd.last_iterate(model, x, y)]  # eq. 9's inner max
    if method == "max":
        worst = WorstCase(pgds)
        return lambda model, x, y: [worst(model, x, y)]
    if method == "avg":
        return lambda model, x, y: list(adversarial_examples(pgds, model, x, y).values())
    msd = MSD(
        {norm: pgd.threat for norm, pgd in pgds.items()},
        steps=max(cfg.steps for cfg in attacks.values()),
        step_sizes={norm: cfg.step_size for norm, cfg in attacks.items()},
    )
    return lambda model, x, y: [msd(model, x, y)]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    inputs: TrainingInputs,
    amp: bool = False,
) -> dict[str, float]:
    """One parameter update on a batch; returns the loss and the accuracy on the trained inputs.

    `model` may be wrapped in DistributedDataParallel; attacks run on the bare model so that
    their gradient computations never touch DDP's reducer.
    """
    net = unwrap(model)
    with autocast(x.device, amp):
        if isinstance(net, HyperResNet):
            weights = net.generate()
            with net.pinned([w.detach() for w in weights]):
                xs = inputs(net, x, y)
            with net.pinned(weights):
                model.train()
                logits = model(torch.cat(xs))
        else:
            xs = inputs(net, x, y)
            model.train()
            logits = model(torch.cat(xs))
        targets = y.repeat(len(xs))
        loss = F.cross_entropy(logits.float(), targets)  # equal-size batches: mean of eq. 6 terms
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    accuracy = (logits.argmax(1) == targets).float().mean()
    return {"loss": loss.item(), "accuracy": accuracy.item()}


def train_epoch(
    model: nn.Module,
    data: ImageArrays,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    inputs: TrainingInputs,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    augment: bool = False,
    amp: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """`steps` updates over a `seed`-shuffled pass of `data`; mean loss and accuracy."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    losses, accuracies = [], []
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = data.images[idx].to(device).float().div_(255)
        y = data.labels[idx].to(device)
        if augment:
            x = random_crop_flip(x)
        stats = train_step(model, x, y, optimizer, inputs, amp)
        scheduler.step()
        losses.append(stats["loss"])
        accuracies.append(stats["accuracy"])
    return {"loss": sum(losses) / steps, "train_accuracy": sum(accuracies) / steps}


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule: cosine decay, multistep (x0.1 at 50% and 75%) or constant."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if name == "multistep":
        milestones = [total_steps // 2, (3 * total_steps) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown lr schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
