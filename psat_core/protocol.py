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

from psat_core.adaptive import MemberTransfer, adaptive_attacks
from psat_core.apgd import APGD
from psat_core.attacks import PGD, AttackConfig, threat_model
from psat_core.crosscheck import crosscheck_attacks
from psat_core.metrics import PerSampleResult

__all__ = ["SUITES", "AUTOATTACK", "attack_suite", "paper_view"]

SUITES = ("paper", "strong")
# AutoAttack "standard": (APGD-CE restarts, APGD-T target classes) per norm
AUTOATTACK = {"linf": (1, 9), "l2": (1, 9), "l1": (5, 5)}


def attack_suite(
    suite: str,
    configs: Mapping[str, AttackConfig],
    *,
    ensemble: bool,
    apgd_steps: int = 100,
    gate_temperature: float = 0.1,
    seed: int = 0,
) -> dict[str, object]:
    """The attacks of ``suite`` at the radii and PGD budgets of ``configs`` (keyed by norm).

    ``ensemble``: the model is a :class:`~psat_core.ensemble.PSATEnsemble` (adds the gate and
    transfer attacks to ``strong``). ``seed`` seeds the APGD starts, so a row is reproducible.
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
            crafters = [attacks[f"{norm}/{name}"] for name in ("pgd", "apgd-ce", "apgd-t")]
            attacks[f"{norm}/transfer"] = MemberTransfer(crafters)
    return attacks


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
