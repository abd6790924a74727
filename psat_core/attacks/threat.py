"""Threat models: the sets a perturbation may range over (eq. 1), one small class per norm.

Inputs live in the pixel box [0, 1]; any normalization is the model's own first module. A
perturbation ``delta`` has the shape of the input batch ``x`` ``(B, *)``; every threat model
constrains it to

    S_p(x) = { delta : ||delta||_p <= eps }  ∩  { delta : 0 <= x + delta <= 1 }

(the paper's ball B(p, eps) of eq. 1, intersected with the image box).

After MadryLab/robustness ``attack_steps.py``: one :class:`ThreatModel` per norm
(:class:`LinfBall`, :class:`L2Ball`, :class:`L1Ball`), each with ``random_start``, ``step`` (the
steepest-ascent argmax of eq. 3) and ``project`` (the proj of eqs. 2-3); the exact ℓ1 projection
:func:`project_l1_ball`; the name -> class table :data:`THREAT_MODELS` and :func:`threat_model`.
The loops that use them are in :mod:`psat_core.attacks.pgd` (one PGD loop),
:mod:`psat_core.attacks.multi` (MSD) and :mod:`psat_core.attacks.apgd`.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from psat_core.settings import NORMS, check_positive, invalid

__all__ = [
    "ThreatModel",
    "LinfBall",
    "L2Ball",
    "L1Ball",
    "THREAT_MODELS",
    "threat_model",
    "project_l1_ball",
    "per_sample",
]


# --------------------------------------------------------------------------- helpers


def per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``(B,)`` to broadcast against ``like`` ``(B, *)``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _clip_to_box(delta: Tensor, x: Tensor) -> Tensor:
    """The part of ``delta`` that keeps ``x + delta`` inside [0, 1]."""
    return (x + delta).clamp_(0.0, 1.0) - x


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
        return self.project(direction * per_sample(radius / norms, x), x)

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
        return _clip_to_box(delta * per_sample(factor, delta), x)


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
