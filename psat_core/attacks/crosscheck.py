"""Attacks from libraries nobody here wrote, behind the evaluator's ``attack(model, x, y)``.

torchattacks ``PGD``, ``PGDL2`` and ``APGD`` (ℓ∞, ℓ2) and foolbox ``SparseL1DescentAttack``
(ℓ1), each at the radius of our own eval attack for its norm; on ensembles, torchattacks
``Square`` (ℓ∞, ℓ2), gradient-free. Named ``"<norm>/<library>.<name>"``
they count under their norm (see :mod:`psat_core.metrics`): a point is robust for the norm only
if it withstands ours and theirs, so a weak attack of ours cannot flatter a result. Each wrapper
carries our :class:`~psat_core.attacks.threat.ThreatModel`, so the evaluator checks their ``x_adv``
against the same ε-ball. Part of the ``strong`` suite (:mod:`psat_core.attacks.suites`).
"""

from __future__ import annotations

from collections.abc import Mapping

import foolbox
import torch
import torchattacks
from torch import Tensor, nn

from psat_core.attacks.pgd import eval_mode
from psat_core.attacks.threat import ThreatModel, threat_model
from psat_core.settings import AttackConfig


class Torchattacks:
    """A torchattacks attack class, built per call on the model at hand. Square, which seeds
    itself, takes the seed the evaluator set for this batch (`torch.initial_seed`)."""

    def __init__(self, name: str, threat: ThreatModel, **kwargs) -> None:
        self.name = name
        self.threat = threat
        self.kwargs = kwargs

    @property
    def cost(self) -> int:
        """Gradient passes per point; Square's queries are forward passes (a third of one)."""
        if "n_queries" in self.kwargs:
            return max(1, self.kwargs["n_queries"] // 3)
        return self.kwargs.get("steps", 1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        attack_cls = getattr(torchattacks, self.name)
        seeded = {"seed": torch.initial_seed()} if self.name == "Square" else {}
        with eval_mode(model):
            attack = attack_cls(model, eps=self.threat.eps, **self.kwargs, **seeded)
            return attack(x, y).detach()

    def __repr__(self) -> str:
        return f"torchattacks.{self.name}({self.threat!r}, {self.kwargs})"


class FoolboxSparseL1:
    """foolbox's ``SparseL1DescentAttack`` (Tramèr and Boneh's ℓ1 SLIDE) with bounds [0, 1]."""

    def __init__(
        self, threat: ThreatModel, steps: int, step_size: float, quantile: float = 0.99
    ) -> None:
        self.threat = threat
        self.steps = steps
        self.step_size = step_size
        self.quantile = quantile

    @property
    def cost(self) -> int:
        return self.steps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        attack = foolbox.attacks.SparseL1DescentAttack(
            steps=self.steps, abs_stepsize=self.step_size, quantile=self.quantile, random_start=True
        )
        with eval_mode(model):
            fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
            _, x_adv, _ = attack(fmodel, x, y, epsilons=self.threat.eps)
        return x_adv.detach()

    def __repr__(self) -> str:
        return f"foolbox.SparseL1DescentAttack({self.threat!r}, steps={self.steps})"


def square_attacks(configs: Mapping[str, AttackConfig], queries: int) -> dict[str, Torchattacks]:
    """``<norm>/torchattacks.Square`` (Andriushchenko et al. 2020; AutoAttack's gradient-free
    attack) for ℓ∞ and ℓ2: margin loss, ``queries`` queries, one restart, at our radii. It
    needs no gradient, so an argmin gate cannot mislead it."""
    return {
        f"{norm}/torchattacks.Square": Torchattacks(
            "Square",
            threat_model(norm, cfg.eps),
            norm={"linf": "Linf", "l2": "L2"}[norm],
            n_queries=queries,
            n_restarts=1,
            loss="margin",
        )
        for norm, cfg in configs.items()
        if norm in ("linf", "l2")
    }


def crosscheck_attacks(configs: Mapping[str, AttackConfig]) -> dict[str, object]:
    """Third-party attacks at the radius and step budget of our eval ``configs`` (by norm)."""
    attacks: dict[str, object] = {}
    for norm, cfg in configs.items():
        threat = threat_model(norm, cfg.eps)
        if norm == "linf":
            attacks["linf/torchattacks.PGD"] = Torchattacks(
                "PGD", threat, alpha=cfg.step_size, steps=cfg.steps, random_start=True
            )
        elif norm == "l2":
            attacks["l2/torchattacks.PGDL2"] = Torchattacks(
                "PGDL2", threat, alpha=cfg.step_size, steps=cfg.steps, random_start=True
            )
        if norm in ("linf", "l2"):
            attacks[f"{norm}/torchattacks.APGD"] = Torchattacks(
                "APGD", threat, norm={"linf": "Linf", "l2": "L2"}[norm], steps=cfg.steps
            )
        if norm == "l1":
            attacks["l1/foolbox.SparseL1Descent"] = FoolboxSparseL1(
                threat, cfg.steps, cfg.step_size
            )
    return attacks
