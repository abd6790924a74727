"""Multi-perturbation attacks: the worst case over several threat models (eqs. 5 and 7).

:class:`WorstCase` ("max", eq. 5) runs one :class:`~psat_core.attacks.pgd.PGD` per threat model
and keeps the highest-loss example; :class:`MSD` (eq. 7) runs the one loop of
:func:`~psat_core.attacks.pgd.ascend` with a step that chooses among the threat models. The
"avg" training inputs of eq. 6 are :func:`~psat_core.attacks.pgd.adversarial_examples`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from psat_core.attacks.pgd import PGD, WorstIterate, ascend, eval_mode, loss_and_wrong
from psat_core.attacks.threat import ThreatModel
from psat_core.settings import check_count, check_positive, invalid

__all__ = ["WorstCase", "MSD"]


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
        worst = WorstIterate(x)

        def move(delta: Tensor, grad: Tensor) -> Tensor:  # eq. 7: the highest-loss step wins
            with torch.no_grad():
                candidates = [
                    t.project(t.step(delta, grad, s, x), x)
                    for t, s in zip(threats, sizes, strict=True)
                ]
                scored = [loss_and_wrong(model, x + cand, y) for cand in candidates]
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
