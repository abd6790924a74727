"""Threat models and projected-gradient attacks for multi-perturbation adversarial training.

Inputs live in the pixel box [0, 1]; any normalization is the model's own first module. A
perturbation ``delta`` has the shape of the input batch ``x`` ``(B, *)``; every threat model
constrains it to

    S_p(x) = { delta : ||delta||_p <= eps }  ∩  { delta : 0 <= x + delta <= 1 }

(the paper's ball B(p, eps) of eq. 1, intersected with the image box).

Layout (after MadryLab/robustness ``attack_steps.py`` / ``attacker.py``):

* one small :class:`ThreatModel` per norm (:class:`LinfBall`, :class:`L2Ball`, :class:`L1Ball`),
  each with ``random_start``, ``step`` (the steepest-ascent argmax of eq. 3) and ``project``
  (the proj of eqs. 2-3), and the name -> class table :data:`THREAT_MODELS`;
* one PGD loop for every norm, :class:`PGD` (eq. 3), which keeps the worst iterate per example
  across steps and restarts;
* the multi-perturbation attacks: :class:`WorstCase` (eq. 5, "max"), :class:`MSD` (eq. 7) and
  :func:`adversarial_examples` (the per-norm examples whose losses eq. 6, "avg", averages);
* :func:`make_attacks`, the PGD of each :class:`~psat_core.settings.AttackConfig` (validated
  settings, with the per-dataset defaults, live torch-free in :mod:`psat_core.settings`).

Example::

    >>> cfgs = attack_defaults("cifar10", "train")   # psat_core.settings
    >>> pgd = PGD.from_config(cfgs["linf"])
    >>> x_adv = pgd(model, images, labels)          # images in [0, 1], shape (B, C, H, W)
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psat_core.settings import NORMS, AttackConfig, check_count, check_positive, invalid

__all__ = [
    "ThreatModel",
    "LinfBall",
    "L2Ball",
    "L1Ball",
    "THREAT_MODELS",
    "threat_model",
    "project_l1_ball",
    "AttackResult",
    "ThreatAttack",
    "ascend",
    "cross_entropy",
    "PGD",
    "WorstCase",
    "MSD",
    "adversarial_examples",
    "make_attacks",
    "eval_mode",
]


# --------------------------------------------------------------------------- helpers


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``(B,)`` to broadcast against ``like`` ``(B, *)``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _clip_to_box(delta: Tensor, x: Tensor) -> Tensor:
    """The part of ``delta`` that keeps ``x + delta`` inside [0, 1]."""
    return (x + delta).clamp_(0.0, 1.0) - x


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


# --------------------------------------------------------------------------- threat models


class ThreatModel(ABC):
    """An ℓp ball of radius ``eps`` around ``x``, intersected with the box [0, 1].

    Constraint set: ``S = {delta : ||delta||_p <= eps, 0 <= x + delta <= 1}``.

    Subclasses implement the three operations of one PGD iteration (eq. 3)::

        delta <- project(step(delta, grad, step_size, x), x)

    All tensors are batches of shape ``(B, *)``; norms are taken per sample over all
    non-batch dimensions.

    Args:
        eps: radius of the ball, > 0.
    """

    norm: ClassVar[str]
    p: ClassVar[float]

    def __init__(self, eps: float) -> None:
        check_positive(type(self).__name__, "eps", eps)
        self.eps = float(eps)

    @abstractmethod
    def random_start(self, x: Tensor) -> Tensor:
        """A random ``delta`` in ``S`` (already projected), same shape as ``x``."""

    @abstractmethod
    def step(
        self, delta: Tensor, grad: Tensor, step_size: float, x: Tensor | None = None
    ) -> Tensor:
        """``delta + argmax_{||v||_p <= step_size} v^T grad`` (eq. 3's steepest ascent step).

        ``x`` (the clean input) is optional; :class:`L1Ball` uses it to skip saturated pixels.
        """

    @abstractmethod
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        """Project ``delta`` onto the ball (eq. 2), then clip so that ``x + delta`` is in [0, 1]."""

    def distance(self, delta: Tensor) -> Tensor:
        """Per-sample ``||delta||_p``, shape ``(B,)``."""
        return delta.flatten(1).norm(p=self.p, dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g})"


class LinfBall(ThreatModel):
    """ℓ∞ threat model: ``S = {delta : ||delta||_∞ <= eps, 0 <= x + delta <= 1}``.

    Step: ``delta + step_size * sign(grad)`` (FGSM direction). Projection: clip to the ε-box,
    then to the image box (exact: the intersection of two boxes). Random start: uniform in the box.
    """

    norm = "linf"
    p = math.inf

    def random_start(self, x: Tensor) -> Tensor:
        delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        return self.project(delta, x)

    def step(
        self, delta: Tensor, grad: Tensor, step_size: float, x: Tensor | None = None
    ) -> Tensor:
        return delta + step_size * grad.sign()

    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        return _clip_to_box(delta.clamp(-self.eps, self.eps), x)


class L2Ball(ThreatModel):
    """ℓ2 threat model: ``S = {delta : ||delta||_2 <= eps, 0 <= x + delta <= 1}``.

    Step: ``delta + step_size * grad / ||grad||_2`` (per sample). Projection: rescale rows with
    ``||delta||_2 > eps`` onto the sphere, then clip to the image box (clipping only shrinks
    coordinates, so the result stays in the ball). Random start: a uniformly random direction
    with radius ``eps * U(0, 1)``.
    """

    norm = "l2"
    p = 2.0

    def random_start(self, x: Tensor) -> Tensor:
        direction = torch.randn_like(x)
        norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
        radius = self.eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        return self.project(direction * _per_sample(radius / norms, x), x)

    def step(
        self, delta: Tensor, grad: Tensor, step_size: float, x: Tensor | None = None
    ) -> Tensor:
        g = grad.flatten(1)
        # divide by the largest entry first: an exact unit direction even for tiny gradients
        g = g / g.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1.0)  # norm >= 1 unless grad == 0
        return delta + step_size * g.view_as(delta)

    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (self.eps / norms).clamp(max=1.0)
        return _clip_to_box(delta * _per_sample(factor, delta), x)


def project_l1_ball(
    v: Tensor, eps: float, lower: Tensor | None = None, upper: Tensor | None = None
) -> Tensor:
    """Exact Euclidean projection of each row of ``v`` onto ``{w : ||w||_1 <= eps}`` (eq. 2),
    intersected with the box ``lower <= w <= upper`` when given (``lower <= 0 <= upper``).

    The solution is ``w_i = sign(v_i) * min(max(|v_i| - theta, 0), c_i)``, ``c_i`` the box's
    bound on the side of ``v_i``: the ℓ1 norm ``f(theta)`` of that is piecewise linear and
    decreasing, with kinks at ``|v_i| - c_i`` and ``|v_i|``, so sorting the kinks gives the
    ``theta`` with ``f(theta) = eps`` exactly (Duchi et al. 2008 without the box; Croce & Hein
    2021, "Mind the box", with it). Rows already inside are only clipped to the box (bit for bit
    unchanged when inside it too).

    Args:
        v: tensor of shape ``(B, *)``.
        eps: radius, > 0.
        lower, upper: box bounds of the shape of ``v`` (for a perturbation of ``x`` in the image
            box: ``-x`` and ``1 - x``); default unbounded.

    Returns:
        Tensor of the same shape and dtype as ``v``.
    """
    check_positive("project_l1_ball", "eps", eps)
    flat = v.flatten(1).double()  # theta from cumulative sums: float64 keeps float32 exact
    magnitude = flat.abs()
    cap = torch.full_like(flat, math.inf)
    if lower is not None and upper is not None:
        cap = torch.where(flat >= 0, upper.flatten(1), -lower.flatten(1)).double().clamp_min(0.0)
    clipped = torch.minimum(magnitude, cap)
    over = clipped.sum(dim=1) > eps  # only rows over budget shrink
    out = flat.sign() * clipped
    if bool(over.any()):
        a, c = magnitude[over], cap[over]
        kinks = torch.cat([(a - c).clamp_min(0.0), a], dim=1)  # -inf cap: starts at 0
        change = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1)
        kinks, order = kinks.sort(dim=1, stable=True)
        slope = change.gather(1, order).cumsum(dim=1)  # f's slope right after each kink
        # f at each kink: f(first kink) = sum(min(a, c)), then linear with the slope before it
        steps = slope[:, :-1] * kinks.diff(dim=1)
        f = clipped[over].sum(dim=1, keepdim=True) + torch.cat(
            [torch.zeros_like(steps[:, :1]), steps.cumsum(dim=1)], dim=1
        )
        last = (f > eps).sum(dim=1, keepdim=True) - 1  # the last kink still over budget
        f0, k0, s0 = f.gather(1, last), kinks.gather(1, last), slope.gather(1, last)
        theta = k0 + (f0 - eps) / (-s0).clamp_min(1.0)
        out[over] = flat[over].sign() * torch.minimum((a - theta).clamp_min(0.0), c)
    return out.to(v.dtype).view_as(v)


class L1Ball(ThreatModel):
    """ℓ1 threat model: ``S = {delta : ||delta||_1 <= eps, 0 <= x + delta <= 1}``.

    Step (sparse steepest ascent, Tramèr & Boneh 2019 "SLIDE" / Maini et al. 2020): among the
    coordinates not saturated in the gradient's direction (``x + delta`` at 1 with
    ``grad > 0``, or at 0 with ``grad < 0``), move the ``k = max(1, ceil((1 - sparsity) * d))``
    with the largest ``|grad|`` (those above the ``sparsity`` quantile of ``|grad|``; ``d`` = the
    number of coordinates per sample) by ``sign(grad)``, scaled so the step's ℓ1 norm is
    ``step_size``; at least :attr:`MIN_COORDINATES` move, since the top 1% of a small input
    (digits' 64 pixels) is a single pixel. Projection: the exact projection onto the ℓ1 ball
    intersected with the image box (:func:`project_l1_ball` with the box: clipping after the
    ball projection would waste budget). Random start: ``k`` random coordinates with
    Laplace-distributed values, rescaled to ℓ1 norm ``eps * U(0, 1)`` — sparse, like the steps.

    Args:
        eps: radius, > 0.
        sparsity: quantile in [0, 1) of ``|grad|`` above which coordinates move (default 0.99:
            the top 1%, e.g. 31 of CIFAR's 3072 coordinates).
    """

    MIN_COORDINATES: ClassVar[int] = 8

    norm = "l1"
    p = 1.0

    def __init__(self, eps: float, sparsity: float = 0.99) -> None:
        super().__init__(eps)
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
            raise invalid("L1Ball", "sparsity", sparsity, "a number in [0, 1)")
        if not 0.0 <= sparsity < 1.0:
            raise invalid("L1Ball", "sparsity", sparsity, "a number in [0, 1)")
        self.sparsity = float(sparsity)

    def coordinates_per_step(self, d: int) -> int:
        """``k``, how many of ``d`` coordinates one step (and the random start) moves."""
        return min(d, max(self.MIN_COORDINATES, math.ceil((1.0 - self.sparsity) * d - 1e-9)))

    def random_start(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        k = self.coordinates_per_step(flat.shape[1])
        support = torch.rand_like(flat).topk(k, dim=1).indices
        laplace = torch.empty(flat.shape[0], k, device=x.device, dtype=x.dtype).exponential_()
        laplace = laplace * (torch.randint_like(laplace, 2) * 2 - 1)
        delta = torch.zeros_like(flat).scatter_(1, support, laplace)
        radius = self.eps * torch.rand(flat.shape[0], 1, device=x.device, dtype=x.dtype)
        delta = delta * radius / delta.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
        return self.project(delta.view_as(x), x)

    def step(
        self, delta: Tensor, grad: Tensor, step_size: float, x: Tensor | None = None
    ) -> Tensor:
        g = grad.flatten(1)
        score = g.abs()
        if x is not None:  # skip pixels that cannot move further in the gradient's direction
            x_adv = (x + delta).flatten(1)
            tol = 8 * torch.finfo(x_adv.dtype).eps
            saturated = ((x_adv >= 1 - tol) & (g > 0)) | ((x_adv <= tol) & (g < 0))
            score = score.masked_fill(saturated, 0.0)
        top, idx = score.topk(self.coordinates_per_step(g.shape[1]), dim=1)
        direction = torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx).sign() * (top > 0))
        # ||direction||_1 = number of moved coordinates; rescale to step_size (zero if none move)
        direction = direction * (step_size / direction.abs().sum(dim=1, keepdim=True).clamp_min(1))
        return delta + direction.view_as(delta)

    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        return project_l1_ball(delta, self.eps, lower=-x, upper=1.0 - x)

    def __repr__(self) -> str:
        return f"L1Ball(eps={self.eps:g}, sparsity={self.sparsity:g})"


THREAT_MODELS: dict[str, type[ThreatModel]] = {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}


def threat_model(norm: str, eps: float, **kwargs: float) -> ThreatModel:
    """Build the threat model named ``norm`` (one of :data:`NORMS`) with radius ``eps``.

    Extra keyword arguments go to the class (e.g. ``sparsity`` for ``"l1"``).
    """
    if norm not in THREAT_MODELS:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
    return THREAT_MODELS[norm](eps, **kwargs)


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


class _Worst:
    """Per-example worst iterate: a misclassified iterate beats a correct one, then higher loss."""

    def __init__(self, x: Tensor) -> None:
        self.delta = torch.zeros_like(x)
        self.loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        self.wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.tag = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def update(self, delta: Tensor, loss: Tensor, wrong: Tensor, tag: Tensor | int = 0) -> None:
        loss = loss.float()
        better = (wrong & ~self.wrong) | ((wrong == self.wrong) & (loss > self.loss))
        self.delta = torch.where(_per_sample(better, delta), delta, self.delta)
        self.loss = torch.where(better, loss, self.loss)
        self.wrong = torch.where(better, wrong, self.wrong)
        self.tag = torch.where(better, torch.as_tensor(tag, device=better.device), self.tag)

    def result(self, x: Tensor) -> AttackResult:
        return AttackResult((x + self.delta).clamp_(0.0, 1.0), self.loss, self.wrong)

    def merge(self, index: Tensor, found: _Worst) -> None:
        """Fold a run on the examples ``index`` of the batch into its worst points."""
        delta, loss, wrong = self.delta.clone(), self.loss.clone(), self.wrong.clone()
        delta[index], loss[index], wrong[index] = found.delta, found.loss, found.wrong
        self.update(delta, loss, wrong)


def _loss_and_wrong(model: nn.Module, x_in: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
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
    worst: _Worst | None = None,
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
        worst = _Worst(x)
        with eval_mode(model), torch.enable_grad():
            for _ in range(self.restarts):
                todo = (~worst.wrong).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                xs, ys = x[todo], y[todo]
                found = _Worst(xs)
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


# --------------------------------------------------------------------------- multi-perturbation


def _check_names(owner: str, field: str, mapping: Mapping[str, object]) -> None:
    if not mapping:
        raise invalid(owner, field, dict(mapping), "a non-empty mapping")


def _pick(stacked: Tensor, index: Tensor) -> Tensor:
    """``stacked[index[b], b]`` for every ``b``: stacked ``(A, B, *)``, index ``(B,)``."""
    return stacked[index, torch.arange(index.shape[0], device=index.device)]


class WorstCase:
    """Worst case over several attacks ("max", eq. 5; Tramèr & Boneh 2019).

    Runs every attack and keeps, per example, the adversarial input with the highest loss.

    Args:
        attacks: name -> :class:`PGD`, e.g. ``{"linf": ..., "l2": ..., "l1": ...}``; the order
            of the mapping gives the indices returned by :meth:`attack_with_choice`
            (``self.names``).
    """

    def __init__(self, attacks: Mapping[str, PGD]) -> None:
        _check_names("WorstCase", "attacks", attacks)
        self.attacks = dict(attacks)
        self.names = tuple(self.attacks)

    def attack_with_choice(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_adv, norm_index)``: the worst example and which attack found it, ``(B,)`` long."""
        results = [attack.perturb(model, x, y) for attack in self.attacks.values()]
        choice = torch.stack([r.loss for r in results]).argmax(dim=0)  # eq. 5 per example
        return _pick(torch.stack([r.x_adv for r in results]), choice), choice

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.attack_with_choice(model, x, y)[0]


class MSD:
    """Multi steepest descent (Maini, Wong & Kolter 2020; eq. 7).

    At every step, from the current ``delta`` take each threat model's steepest ascent step,
    project it onto that model's set, and keep per example the candidate with the highest loss;
    so ``delta`` always lies in the union of the sets. Per example the worst iterate over all
    steps is returned (a misclassified one first, then the highest loss). Costs one
    forward/backward pass plus one forward pass per threat model per step.

    Args:
        threats: name -> :class:`ThreatModel`; mapping order gives the returned indices.
        steps: iterations, >= 1.
        step_sizes: name -> step size α_p, > 0; same keys as ``threats``.
        random_start: start each example at a random point of a randomly chosen threat model's
            set rather than 0 (default True).
    """

    def __init__(
        self,
        threats: Mapping[str, ThreatModel],
        steps: int,
        step_sizes: Mapping[str, float],
        random_start: bool = True,
    ) -> None:
        _check_names("MSD", "threats", threats)
        check_count("MSD", "steps", steps)
        if set(step_sizes) != set(threats):
            raise invalid("MSD", "step_sizes", dict(step_sizes), f"keyed by {sorted(threats)}")
        for name, size in step_sizes.items():
            check_positive("MSD", f"step_sizes[{name!r}]", size)
        self.threats = dict(threats)
        self.names = tuple(self.threats)
        self.steps = steps
        self.step_sizes = {name: float(step_sizes[name]) for name in self.names}
        self.random_start = bool(random_start)

    def attack_with_choice(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_adv, norm_index)``: the worst iterate and the threat model whose step made it."""
        x, y = x.detach(), y.detach()
        threats = list(self.threats.values())
        sizes = list(self.step_sizes.values())
        worst = _Worst(x)

        def move(delta: Tensor, grad: Tensor) -> Tensor:  # eq. 7: the highest-loss step wins
            with torch.no_grad():
                candidates = [
                    t.project(t.step(delta, grad, s, x), x)
                    for t, s in zip(threats, sizes, strict=True)
                ]
                scored = [_loss_and_wrong(model, x + cand, y) for cand in candidates]
            losses = torch.stack([loss.float() for loss, _ in scored])
            choice = losses.argmax(dim=0)
            delta = _pick(torch.stack(candidates), choice)
            wrong = _pick(torch.stack([w for _, w in scored]), choice)
            worst.update(delta, _pick(losses, choice), wrong, choice)
            return delta

        with eval_mode(model), torch.enable_grad():
            if self.random_start:
                pick = torch.randint(len(threats), (x.shape[0],), device=x.device)
                delta = _pick(torch.stack([t.random_start(x) for t in threats]), pick)
            else:
                delta = torch.zeros_like(x)
            ascend(model, x, y, delta, self.steps, move)
        return worst.result(x).x_adv, worst.tag

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.attack_with_choice(model, x, y)[0]


def adversarial_examples(
    attacks: Mapping[str, PGD], model: nn.Module, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """One adversarial batch per attack, ``{name: x_adv}`` (the terms eq. 6, "avg", averages)."""
    return {name: attack(model, x, y) for name, attack in attacks.items()}


def make_attacks(configs: Mapping[str, AttackConfig]) -> dict[str, PGD]:
    """``{name: PGD.from_config(cfg)}`` for a mapping such as :func:`attack_defaults` returns."""
    return {name: PGD.from_config(cfg) for name, cfg in configs.items()}
