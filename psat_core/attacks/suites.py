"""The evaluation's attack suites, each defined once: the evaluator chooses what it attacks with
(auto-attack's model, ``autoattack.py``'s ``set_version``).

* ``paper``: per-norm PGD through the model, as the paper evaluates (Tables 1-4).
* ``strong`` (the default): ``paper`` plus, per norm, AutoAttack's APGD-CE and APGD-T at its
  standard budget (:mod:`psat_core.attacks.apgd`; FAB-T is not run), the third-party
  cross-check (:mod:`psat_core.attacks.crosscheck`) and, on an ensemble, the attacks that know
  its gate, the members' transferred examples (:mod:`psat_core.attacks.adaptive`) and, last,
  the gradient-free Square (ℓ∞, ℓ2) on what all of them left standing.

A suite is a sequence of :class:`AttackFamily` in :data:`SUITE_FAMILIES`; each family builds its
attacks (:func:`attack_suite`) and describes them for the report (:func:`describe_suite`), so an
attack added to a suite brings its description with it.

Every attack is named ``"<norm>/<attack>"``; :func:`psat_core.metrics.evaluate_per_sample` runs
each on the points still robust and counts a point robust for a norm only if it survives all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from psat_core.attacks.adaptive import MemberTransfer, adaptive_attacks
from psat_core.attacks.apgd import APGD
from psat_core.attacks.crosscheck import crosscheck_attacks, square_attacks
from psat_core.attacks.pgd import PGD
from psat_core.attacks.threat import threat_model
from psat_core.metrics import PerSampleResult, norm_of
from psat_core.settings import NORM_SYMBOLS, AttackConfig

__all__ = [
    "SUITES",
    "SUITE_FAMILIES",
    "AUTOATTACK",
    "TRANSFER_CRAFTERS",
    "AttackFamily",
    "SuiteOptions",
    "attack_suite",
    "describe_suite",
    "transfer_crafters",
    "paper_view",
]

# AutoAttack "standard": (APGD-CE restarts, APGD-T target classes) per norm
AUTOATTACK = {"linf": (1, 9), "l2": (1, 9), "l1": (5, 5)}
# the attacks whose examples against each member the ensemble's transfer attack scores
TRANSFER_CRAFTERS = ("pgd", "apgd-ce", "apgd-t")
# how a suite's outcome is counted (psat_core.metrics), the last line of every description
COUNTING = (
    "- a point counts as robust for a norm only if it withstands every attack of that norm; "
    "Max counts every attack. Each row's attacks are seeded from `data.seed` and its models"
)


@dataclass(frozen=True)
class SuiteOptions:
    """What a suite's attacks take besides the per-norm configs (see :func:`attack_suite`)."""

    apgd_steps: int = 100
    gate_temperature: float = 0.1
    seed: int = 0
    member_examples: Mapping[str, Tensor] | None = None
    square_queries: int = 5000  # AutoAttack's


class AttackFamily(ABC):
    """Some attacks of a suite, defined once: what they are and how the report describes them.

    ``ensemble_only``: added only when the evaluated model is a
    :class:`~psat_core.ensemble.PSATEnsemble` (but always described: the report covers both).
    """

    ensemble_only = False

    @abstractmethod
    def attacks(
        self,
        configs: Mapping[str, AttackConfig],
        options: SuiteOptions,
        earlier: Mapping[str, object],
    ) -> dict[str, object]:
        """``{"<norm>/<attack>": attack}`` at the radii and budgets of ``configs`` (keyed by
        norm); ``earlier``: the suite's attacks before this family's, in order."""

    @abstractmethod
    def describe(self, configs: Mapping[str, AttackConfig], options: SuiteOptions) -> list[str]:
        """One Markdown bullet (or one per norm) per attack of :meth:`attacks`."""


class PerNormPGD(AttackFamily):
    """``<norm>/pgd``: our PGD (eq. 3) through the model at each eval config, as in the paper."""

    def attacks(self, configs, options, earlier):
        return {f"{n}/pgd": PGD.from_config(c) for n, c in configs.items()}

    def describe(self, configs, options):
        return [
            f"- ours, {NORM_SYMBOLS[n]}: PGD, ε={cfg.eps:g}, {cfg.steps} steps of "
            f"{cfg.step_size:g}, {cfg.restarts} restart(s)"
            for n, cfg in configs.items()
        ]


class AutoAttackAPGD(AttackFamily):
    """``<norm>/apgd-ce`` and ``<norm>/apgd-t``: AutoAttack's APGD at its standard restarts and
    targets (:data:`AUTOATTACK`), ``options.apgd_steps`` steps, seeded by ``options.seed``."""

    def attacks(self, configs, options, earlier):
        attacks: dict[str, object] = {}
        for norm, cfg in configs.items():
            threat = threat_model(norm, cfg.eps)
            restarts, targets = AUTOATTACK[norm]
            steps, seed = options.apgd_steps, options.seed
            attacks[f"{norm}/apgd-ce"] = APGD(threat, steps, restarts=restarts, seed=seed)
            attacks[f"{norm}/apgd-t"] = APGD(threat, steps, targets=targets, seed=seed)
        return attacks

    def describe(self, configs, options):
        restarts = ", ".join(f"{NORM_SYMBOLS[n]} {r}/{t}" for n, (r, t) in AUTOATTACK.items())
        return [
            f"- APGD-CE and APGD-T (DLR, targeted), {options.apgd_steps} steps, "
            f"AutoAttack's restarts/targets ({restarts}); ℓ1: ℓ1-APGD with the 3ε-2ε-ε schedule"
        ]


class CrossCheck(AttackFamily):
    """Third-party attacks at our radii and PGD budgets (:func:`crosscheck_attacks`)."""

    def attacks(self, configs, options, earlier):
        return crosscheck_attacks(configs)

    def describe(self, configs, options):
        return [
            "- cross-check, same ε and steps: torchattacks PGD / PGDL2 and APGD (ℓ∞, ℓ2), "
            "foolbox SparseL1DescentAttack (ℓ1)"
        ]


class OnEnsembles(AttackFamily):
    """``<norm>/gate`` and ``<norm>/confident`` (:func:`adaptive_attacks`), then
    ``<norm>/transfer``: the members' examples by the :data:`TRANSFER_CRAFTERS` among
    ``earlier``, crafted now or given as ``options.member_examples`` (norm -> examples)."""

    ensemble_only = True

    def attacks(self, configs, options, earlier):
        attacks: dict[str, object] = adaptive_attacks(configs, options.gate_temperature)
        for norm in configs:
            crafters = [earlier[f"{norm}/{name}"] for name in TRANSFER_CRAFTERS]
            given = options.member_examples
            crafted = None if given is None else given[norm]
            attacks[f"{norm}/transfer"] = MemberTransfer(crafters, crafted)
        return attacks

    def describe(self, configs, options):
        return [
            "- on ensembles: `gate` = plain PGD and PGD through a smooth lowest-entropy gate "
            f"(τ={options.gate_temperature:g}), the worst of both; `confident` = each "
            "member made confidently wrong, keeping what fools the gate; `transfer` = every "
            "member's own PGD, APGD-CE and APGD-T examples, scored by the ensemble"
        ]


class SquareOnEnsembles(AttackFamily):
    """``<norm>/torchattacks.Square`` (ℓ∞, ℓ2; :func:`square_attacks`), last: each point it
    breaks is one every gradient attack left standing (`PerSampleResult.found`)."""

    ensemble_only = True

    def attacks(self, configs, options, earlier):
        return square_attacks(configs, options.square_queries)

    def describe(self, configs, options):
        return [
            f"- on ensembles, gradient-free, last: torchattacks Square (ℓ∞, ℓ2), margin loss, "
            f"{options.square_queries} queries, 1 restart; the points it breaks are the ones "
            "every gradient attack left standing (its column in the report)"
        ]


# Each suite, once: its families in the order they run (a norm's attacks run in this order).
SUITE_FAMILIES: dict[str, tuple[AttackFamily, ...]] = {
    "paper": (PerNormPGD(),),
    "strong": (PerNormPGD(), AutoAttackAPGD(), CrossCheck(), OnEnsembles(), SquareOnEnsembles()),
}
SUITES = tuple(SUITE_FAMILIES)


def _families(suite: str) -> tuple[AttackFamily, ...]:
    if suite not in SUITE_FAMILIES:
        raise ValueError(f"unknown evaluation suite {suite!r}; allowed: {', '.join(SUITES)}")
    return SUITE_FAMILIES[suite]


def attack_suite(
    suite: str,
    configs: Mapping[str, AttackConfig],
    *,
    ensemble: bool,
    apgd_steps: int = 100,
    gate_temperature: float = 0.1,
    seed: int = 0,
    member_examples: Mapping[str, Tensor] | None = None,
    square_queries: int = 5000,
) -> dict[str, object]:
    """The attacks of ``suite`` at the radii and PGD budgets of ``configs`` (keyed by norm).

    ``ensemble``: the model is a :class:`~psat_core.ensemble.PSATEnsemble` (adds the gate and
    transfer attacks to ``strong``). ``seed`` seeds the APGD starts, so a row is reproducible.
    ``member_examples``: norm -> ``(members x TRANSFER_CRAFTERS, N, *)``, the examples this
    suite's crafters found against each member on every image (the member rows',
    :func:`~psat_core.attacks.adaptive.member_examples`): the transfer attack scores them instead
    of crafting its own. ``square_queries``: Square's budget (AutoAttack: 5,000).
    """
    families = _families(suite)
    options = SuiteOptions(apgd_steps, gate_temperature, seed, member_examples, square_queries)
    attacks: dict[str, object] = {}
    for family in families:
        if ensemble or not family.ensemble_only:
            attacks |= family.attacks(configs, options, attacks)
    return attacks


def describe_suite(
    suite: str,
    eval_configs: Mapping[str, AttackConfig],
    apgd_steps: int,
    gate_temperature: float,
    square_queries: int = 5000,
) -> list[str]:
    """One Markdown bullet per attack family of ``suite`` (one per norm for PGD), as
    :func:`attack_suite` builds it from the same arguments, then how a point is counted robust.

    Torch-light: builds no attack. Ensemble-only families are described too.
    """
    options = SuiteOptions(apgd_steps, gate_temperature, square_queries=square_queries)
    lines = [line for family in _families(suite) for line in family.describe(eval_configs, options)]
    return [*lines, COUNTING]


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
