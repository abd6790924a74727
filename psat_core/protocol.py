"""The evaluation's attack suites: the evaluator chooses what it attacks with (auto-attack's model).

* ``paper``: per-norm PGD through the model, as the paper evaluates (Tables 1-4).
* ``strong`` (the default): ``paper`` plus, per norm, AutoAttack's APGD-CE and APGD-T at its
  standard budget (:mod:`psat_core.apgd`; FAB-T and Square are not run), the third-party
  cross-check (:mod:`psat_core.crosscheck`) and, on an ensemble, the attacks that know its gate
  and the members' transferred examples (:mod:`psat_core.adaptive`).

Every attack is named ``"<norm>/<attack>"``; :func:`psat_core.metrics.evaluate_per_sample` runs
each on the points still robust and counts a point robust for a norm only if it survives all.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from psat_core.adaptive import MemberTransfer, adaptive_attacks
from psat_core.apgd import APGD
from psat_core.attacks import PGD, threat_model
from psat_core.crosscheck import crosscheck_attacks
from psat_core.metrics import PerSampleResult, norm_of
from psat_core.settings import AttackConfig

__all__ = [
    "SUITES",
    "AUTOATTACK",
    "TRANSFER_CRAFTERS",
    "attack_suite",
    "transfer_crafters",
    "paper_view",
]

SUITES = ("paper", "strong")
# AutoAttack "standard": (APGD-CE restarts, APGD-T target classes) per norm
AUTOATTACK = {"linf": (1, 9), "l2": (1, 9), "l1": (5, 5)}
# the attacks whose examples against each member the ensemble's transfer attack scores
TRANSFER_CRAFTERS = ("pgd", "apgd-ce", "apgd-t")


def attack_suite(
    suite: str,
    configs: Mapping[str, AttackConfig],
    *,
    ensemble: bool,
    apgd_steps: int = 100,
    gate_temperature: float = 0.1,
    seed: int = 0,
    member_examples: Mapping[str, Tensor] | None = None,
) -> dict[str, object]:
    """The attacks of ``suite`` at the radii and PGD budgets of ``configs`` (keyed by norm).

    ``ensemble``: the model is a :class:`~psat_core.ensemble.PSATEnsemble` (adds the gate and
    transfer attacks to ``strong``). ``seed`` seeds the APGD starts, so a row is reproducible.
    ``member_examples``: norm -> ``(members x TRANSFER_CRAFTERS, N, *)``, the examples this
    suite's crafters found against each member on every image (the member rows',
    :func:`~psat_core.adaptive.member_examples`): the transfer attack scores them instead of
    crafting its own.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown evaluation suite {suite!r}; allowed: {', '.join(SUITES)}")
    attacks: dict[str, object] = {f"{n}/pgd": PGD.from_config(c) for n, c in configs.items()}
    if suite == "paper":
        return attacks
    for norm, cfg in configs.items():
        threat = threat_model(norm, cfg.eps)
        restarts, targets = AUTOATTACK[norm]
        attacks[f"{norm}/apgd-ce"] = APGD(threat, apgd_steps, restarts=restarts, seed=seed)
        attacks[f"{norm}/apgd-t"] = APGD(threat, apgd_steps, targets=targets, seed=seed)
    attacks |= crosscheck_attacks(configs)
    if ensemble:
        attacks |= adaptive_attacks(configs, gate_temperature)
        for norm in configs:
            crafters = [attacks[f"{norm}/{name}"] for name in TRANSFER_CRAFTERS]
            crafted = None if member_examples is None else member_examples[norm]
            attacks[f"{norm}/transfer"] = MemberTransfer(crafters, crafted)
    return attacks


def transfer_crafters(attacks: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """Norm -> ``{name: attack}``: the :data:`TRANSFER_CRAFTERS` among a member's ``strong``
    suite, whose examples it lends to its ensembles' transfer attack."""
    norms = dict.fromkeys(norm_of(name) for name in attacks)
    return {n: {f"{n}/{c}": attacks[f"{n}/{c}"] for c in TRANSFER_CRAFTERS} for n in norms}


def paper_view(result: PerSampleResult) -> PerSampleResult:
    """The ``paper`` suite's outcome, read off a run of any suite: its per-norm PGD attacks.

    Every suite runs ``<norm>/pgd`` first among its norm's attacks, on every correctly
    classified point, so what PGD found does not depend on the attacks after it.
    """
    names = tuple(name for name in result.attack_names if name.endswith("/pgd"))
    kept = ("clean", *names)
    return PerSampleResult(
        names,
        {key: result.correct[key] for key in kept},
        {key: probe for key, probe in result.probes.items() if key in kept},
    )
