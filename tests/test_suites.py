"""psat_core.attacks.suites: each suite defined once, its attacks and their description."""

from __future__ import annotations

import pytest

from psat_core.attacks.suites import (
    AUTOATTACK,
    SUITE_FAMILIES,
    SUITES,
    SuiteOptions,
    attack_suite,
    describe_suite,
)
from psat_core.settings import DATASETS, NORMS, attack_defaults

CONFIGS = attack_defaults("cifar10", "eval", {"l1": {"steps": 60, "restarts": 2}})
COUNTING = (
    "- a point counts as robust for a norm only if it withstands every attack of that norm; "
    "Max counts every attack. Each row's attacks are seeded from `data.seed` and its models"
)
PAPER = [
    "- ours, ℓ∞: PGD, ε=0.0313725, 50 steps of 0.00784314, 10 restart(s)",
    "- ours, ℓ2: PGD, ε=0.5, 50 steps of 0.125, 10 restart(s)",
    "- ours, ℓ1: PGD, ε=12, 60 steps of 1, 2 restart(s)",
]
STRONG = [
    "- APGD-CE and APGD-T (DLR, targeted), 25 steps, AutoAttack's restarts/targets (ℓ∞ 1/9, "
    "ℓ2 1/9, ℓ1 5/5); ℓ1: ℓ1-APGD with the 3ε-2ε-ε schedule",
    "- cross-check, same ε and steps: torchattacks PGD / PGDL2 and APGD (ℓ∞, ℓ2), foolbox "
    "SparseL1DescentAttack (ℓ1)",
    "- on ensembles: `gate` = plain PGD and PGD through a smooth lowest-entropy gate (τ=0.05), "
    "the worst of both; `confident` = each member made confidently wrong, keeping what fools "
    "the gate; `transfer` = every member's own PGD, APGD-CE and APGD-T examples, scored by the "
    "ensemble",
    "- on ensembles, gradient-free, last: torchattacks Square (ℓ∞, ℓ2), margin loss, 5000 "
    "queries, 1 restart; the points it breaks are the ones every gradient attack left standing "
    "(its column in the report)",
]


def test_describe_suite_is_the_reports_text():
    assert describe_suite("paper", CONFIGS, 25, 0.05) == [*PAPER, COUNTING]
    assert describe_suite("strong", CONFIGS, apgd_steps=25, gate_temperature=0.05) == [
        *PAPER,
        *STRONG,
        COUNTING,
    ]


def _attacks_described_by_hand(suite, configs, apgd_steps, gate_temperature):
    """orchestrator.report.attacks_described as it was written by hand, before the suites
    described themselves."""
    headers = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}
    lines = [
        f"- ours, {headers[n]}: PGD, ε={cfg.eps:g}, {cfg.steps} steps of {cfg.step_size:g}, "
        f"{cfg.restarts} restart(s)"
        for n, cfg in configs.items()
    ]
    if suite == "strong":
        restarts = ", ".join(f"{headers[n]} {r}/{t}" for n, (r, t) in AUTOATTACK.items())
        lines += [
            f"- APGD-CE and APGD-T (DLR, targeted), {apgd_steps} steps, "
            f"AutoAttack's restarts/targets ({restarts}); ℓ1: ℓ1-APGD with the 3ε-2ε-ε schedule",
            "- cross-check, same ε and steps: torchattacks PGD / PGDL2 and APGD (ℓ∞, ℓ2), "
            "foolbox SparseL1DescentAttack (ℓ1)",
            "- on ensembles: `gate` = plain PGD and PGD through a smooth lowest-entropy gate "
            f"(τ={gate_temperature:g}), the worst of both; `confident` = each "
            "member made confidently wrong, keeping what fools the gate; `transfer` = every "
            "member's own PGD, APGD-CE and APGD-T examples, scored by the ensemble",
            "- on ensembles, gradient-free, last: torchattacks Square (ℓ∞, ℓ2), margin loss, "
            "5000 queries, 1 restart; the points it breaks are the ones every gradient attack "
            "left standing (its column in the report)",
        ]
    lines.append(
        "- a point counts as robust for a norm only if it withstands every attack of that norm; "
        "Max counts every attack. Each row's attacks are seeded from `data.seed` and its models"
    )
    return lines


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("suite", SUITES)
def test_describe_suite_matches_the_hand_written_description(suite, dataset):
    configs = attack_defaults(dataset, "eval")
    assert describe_suite(suite, configs, 100, 0.1) == _attacks_described_by_hand(
        suite, configs, 100, 0.1
    )


def test_describe_suite_refuses_an_unknown_suite():
    with pytest.raises(ValueError, match="unknown evaluation suite 'auto'.*paper, strong"):
        describe_suite("auto", CONFIGS, 100, 0.1)


def test_attack_suite_order_is_the_families_order():
    configs = attack_defaults("digits", "eval")
    assert list(attack_suite("strong", configs, ensemble=True)) == [
        *(f"{n}/pgd" for n in NORMS),
        *(f"{n}/{a}" for n in NORMS for a in ("apgd-ce", "apgd-t")),
        "linf/torchattacks.PGD",
        "linf/torchattacks.APGD",
        "l2/torchattacks.PGDL2",
        "l2/torchattacks.APGD",
        "l1/foolbox.SparseL1Descent",
        *(f"{n}/{a}" for n in NORMS for a in ("gate", "confident")),
        *(f"{n}/transfer" for n in NORMS),
        "linf/torchattacks.Square",
        "l2/torchattacks.Square",
    ]
    assert list(attack_suite("paper", configs, ensemble=True)) == [f"{n}/pgd" for n in NORMS]


FAMILIES = {type(f).__name__: f for families in SUITE_FAMILIES.values() for f in families}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_attack_family_builds_per_norm_attacks_and_describes_them(name):
    family = FAMILIES[name]
    configs = attack_defaults("digits", "eval")
    options = SuiteOptions(apgd_steps=3, gate_temperature=0.2)
    earlier = attack_suite("strong", configs, ensemble=False)  # what every family may build on
    attacks = family.attacks(configs, options, earlier)
    assert attacks and all(key.partition("/")[0] in configs for key in attacks)
    assert all(hasattr(attack, "threat") for attack in attacks.values())
    lines = family.describe(configs, options)
    assert lines and all(line.startswith("- ") for line in lines)
