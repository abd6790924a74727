"""The one projected-gradient loop (eq. 3) every attack of psat runs, and PGD built on it.

After MadryLab/robustness ``attacker.py``: :func:`ascend` iterates
``delta <- move(delta, ∇_delta loss(model(x + delta), y))``, the ``move`` being a
:class:`~psat_core.attacks.threat.ThreatModel`'s step then projection (or MSD's choice among
several, :mod:`psat_core.attacks.multi`); :class:`WorstIterate` keeps the worst iterate per
example across steps and restarts (per-example losses, ``reduction="none"``); :class:`PGD` is
that loop for one threat model, with random restarts merged per example. Also here: the
attack interface :class:`ThreatAttack` and its :class:`AttackResult`, :func:`eval_mode` (every
attack runs the model in eval mode and restores it), :func:`adversarial_examples` (the per-norm
examples whose losses eq. 6, "avg", averages) and :func:`make_attacks`, the PGD of each
:class:`~psat_core.settings.AttackConfig` (validated settings, with the per-dataset defaults,
live torch-free in :mod:`psat_core.settings`).

Example::

    >>> cfgs = attack_defaults("cifar10", "train")   # psat_core.settings
    >>> pgd = PGD.from_config(cfgs["linf"])
    >>> x_adv = pgd(model, images, labels)          # images in [0, 1], shape (B, C, H, W)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psat_core.attacks.threat import ThreatModel, per_sample, threat_model
from psat_core.settings import AttackConfig, check_count, check_positive, invalid

__all__ = [
    "AttackResult",
    "WorstIterate",
    "ThreatAttack",
    "ascend",
    "cross_entropy",
    "loss_and_wrong",
    "PGD",
    "adversarial_examples",
    "make_attacks",
    "eval_mode",
]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode; restore every submodule's previous ``training`` flag on exit.

    Flags are restored one by one, so a model in training mode with some submodules frozen in
    eval mode (e.g. frozen BatchNorm) comes back exactly as it was, even if the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------- PGD


class AttackResult(NamedTuple):
    """What an attack found per example.

    Attributes:
        x_adv: adversarial inputs in [0, 1], shape ``(B, *)``.
        loss: per-example cross-entropy at ``x_adv``, shape ``(B,)``.
        misclassified: whether the model's prediction at ``x_adv`` is wrong, shape ``(B,)``.
    """

    x_adv: Tensor
    loss: Tensor
    misclassified: Tensor


class WorstIterate:
    """Per-example worst iterate: a misclassified iterate beats a correct one, then higher loss."""

    def __init__(self, x: Tensor) -> None:
        self.delta = torch.zeros_like(x)
        self.loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        self.wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.tag = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def update(self, delta: Tensor, loss: Tensor, wrong: Tensor, tag: Tensor | int = 0) -> None:
        loss = loss.float()
        better = (wrong & ~self.wrong) | ((wrong == self.wrong) & (loss > self.loss))
        self.delta = torch.where(per_sample(better, delta), delta, self.delta)
        self.loss = torch.where(better, loss, self.loss)
        self.wrong = torch.where(better, wrong, self.wrong)
        self.tag = torch.where(better, torch.as_tensor(tag, device=better.device), self.tag)

    def result(self, x: Tensor) -> AttackResult:
        return AttackResult((x + self.delta).clamp_(0.0, 1.0), self.loss, self.wrong)

    def merge(self, index: Tensor, found: WorstIterate) -> None:
        """Fold a run on the examples ``index`` of the batch into its worst points."""
        delta, loss, wrong = self.delta.clone(), self.loss.clone(), self.wrong.clone()
        delta[index], loss[index], wrong[index] = found.delta, found.loss, found.wrong
        self.update(delta, loss, wrong)


def loss_and_wrong(model: nn.Module, x_in: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example cross-entropy of ``model(x_in)`` and whether its prediction is wrong, ``(B,)``
    each: how an iterate is scored without a gradient (MSD's candidates, the adaptive attacks)."""
    logits = model(x_in)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(dim=1) != y


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy, the loss PGD ascends unless told otherwise."""
    return F.cross_entropy(logits, y, reduction="none")


def ascend(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    delta: Tensor,
    steps: int,
    move: Callable[[Tensor, Tensor], Tensor],
    loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    worst: WorstIterate | None = None,
) -> Tensor:
    """The projected-gradient iteration every attack here runs (eq. 3; eq. 7 for MSD):
    ``steps`` times ``delta <- move(delta, ∇_delta loss(model(x + delta), y))``.

    ``move`` takes the step and projects (one threat model's, or MSD's choice among several).
    With ``worst``, each iterate is scored with the loss and prediction of its own gradient
    pass. Returns the last ``delta`` (detached, not scored).
    """
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        value = loss(logits, y)
        (grad,) = torch.autograd.grad(value.sum(), delta)
        delta = delta.detach()
        if worst is not None:
            worst.update(delta, value.detach(), logits.argmax(dim=1) != y)
        delta = move(delta, grad)
    return delta


class ThreatAttack(ABC):
    """An attack within ``self.threat`` whose :meth:`perturb` reports per-example results."""

    threat: ThreatModel

    @property
    def norm(self) -> str:
        return self.threat.norm

    @property
    def eps(self) -> float:
        return self.threat.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial examples ``x_adv`` (detached, in [0, 1], shape of ``x``)."""
        return self.perturb(model, x, y).x_adv

    @abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        """Run the attack; return ``x_adv`` with its per-example loss and misclassification."""


class PGD(ThreatAttack):
    """Projected gradient ascent on the per-example loss (Madry et al. 2018, eq. 3).

    ``delta^{t+1} = proj_S(delta^t + argmax_{||v||_p <= alpha} v^T ∇_delta L(f(x + delta^t), y))``
    for ``t = 0..steps-1``, from ``delta^0 = 0`` or a random point of ``S``; one loop for every
    norm (:func:`ascend`), the norm being the :class:`ThreatModel`'s. Per example it keeps the
    worst iterate over all steps and restarts (a misclassified iterate beats a correctly
    classified one, then the higher loss wins), reusing the forward pass of each gradient step
    to score that iterate. The gradient is taken w.r.t. ``delta`` only (``torch.autograd.grad``):
    parameters' ``.grad`` are never touched. The model runs in eval mode; its previous mode is
    restored afterwards.

    Args:
        threat: the threat model (norm, ε).
        steps: iterations per restart, >= 1.
        step_size: ℓp length α of each step, > 0.
        restarts: random restarts, merged per example, >= 1 (default 1).
        random_start: start each restart at ``threat.random_start(x)`` rather than 0 (default True).
        loss: ``loss(logits, y) -> (B,)`` to ascend (default: the cross-entropy).

    Shapes: ``x`` ``(B, *)`` in [0, 1]; ``y`` ``(B,)`` class indices; returns ``(B, *)``.

    Example::

        >>> pgd = PGD(LinfBall(8 / 255), steps=10, step_size=2 / 255)
        >>> x_adv = pgd(model, x, y)
    """

    def __init__(
        self,
        threat: ThreatModel,
        steps: int,
        step_size: float,
        restarts: int = 1,
        random_start: bool = True,
        loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise invalid("PGD", "threat", threat, "a ThreatModel (see THREAT_MODELS)")
        check_count("PGD", "steps", steps)
        check_positive("PGD", "step_size", step_size)
        check_count("PGD", "restarts", restarts)
        self.threat = threat
        self.steps = steps
        self.step_size = float(step_size)
        self.restarts = restarts
        self.random_start = bool(random_start)
        self.loss = loss

    @classmethod
    def from_config(cls, cfg: AttackConfig) -> PGD:
        """The PGD attack described by ``cfg``."""
        return cls(
            threat_model(cfg.norm, cfg.eps),
            steps=cfg.steps,
            step_size=cfg.step_size,
            restarts=cfg.restarts,
            random_start=cfg.random_start,
        )

    @property
    def cost(self) -> int:
        """Gradient passes per attacked example."""
        return self.steps * self.restarts

    def _start(self, x: Tensor) -> Tensor:
        return self.threat.random_start(x) if self.random_start else torch.zeros_like(x)

    def _move(self, x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        threat = self.threat
        return lambda delta, grad: threat.project(threat.step(delta, grad, self.step_size, x), x)

    def last_iterate(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Madry et al.'s training attack: ``x + delta^steps`` of a single run, unscored.

        It saves the scoring of :meth:`perturb` (one forward pass for the last iterate), which
        only matters where the worst iterate is wanted (evaluation) or restarts must be merged;
        with ``restarts > 1`` it is :meth:`__call__`.
        """
        if self.restarts > 1:
            return self(model, x, y)
        x, y = x.detach(), y.detach()
        with eval_mode(model), torch.enable_grad():
            delta = ascend(model, x, y, self._start(x), self.steps, self._move(x), self.loss)
        return (x + delta).clamp_(0.0, 1.0)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        """Run the attack; return ``x_adv`` with its per-example loss and misclassification.

        Restarts after the first run only on the examples not yet misclassified (AutoAttack's
        rule: a fooled example stays fooled, so the accuracy is the same for less work).
        """
        x, y = x.detach(), y.detach()
        worst = WorstIterate(x)
        with eval_mode(model), torch.enable_grad():
            for _ in range(self.restarts):
                todo = (~worst.wrong).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                xs, ys = x[todo], y[todo]
                found = WorstIterate(xs)
                delta = ascend(
                    model, xs, ys, self._start(xs), self.steps, self._move(xs), self.loss, found
                )
                with torch.no_grad():  # the last iterate has no gradient step to share a pass
                    logits = model(xs + delta)
                    found.update(delta, self.loss(logits, ys), logits.argmax(dim=1) != ys)
                worst.merge(todo, found)
        return worst.result(x)

    def __repr__(self) -> str:
        return (
            f"PGD({self.threat!r}, steps={self.steps}, step_size={self.step_size:g}, "
            f"restarts={self.restarts}, random_start={self.random_start})"
        )


def adversarial_examples(
    attacks: Mapping[str, PGD], model: nn.Module, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """One adversarial batch per attack, ``{name: x_adv}`` (the terms eq. 6, "avg", averages)."""
    return {name: attack(model, x, y) for name, attack in attacks.items()}


def make_attacks(configs: Mapping[str, AttackConfig]) -> dict[str, PGD]:
    """``{name: PGD.from_config(cfg)}`` for a mapping such as :func:`attack_defaults` returns."""
    return {name: PGD.from_config(cfg) for name, cfg in configs.items()}
