"""Threat models and attacks, in [0, 1] pixel space (normalization is the model's first module).

    threat.py      the ℓ∞, ℓ2, ℓ1 balls ∩ the image box (eq. 1): step, projection (eq. 2),
                   random start; project_l1_ball; the name -> class table, threat_model
    pgd.py         the one PGD loop (eq. 3): ascend, WorstIterate (worst iterate per example),
                   PGD, eval_mode; adversarial_examples (eq. 6's terms), make_attacks
    multi.py       the worst case over threat models: WorstCase (eq. 5), MSD (eq. 7)
    apgd.py        AutoAttack's APGD-CE / APGD-T, and ℓ1-APGD
    adaptive.py    attacks on the ensemble's lowest-entropy gate (eq. 12) and transfer attacks
    crosscheck.py  torchattacks' and foolbox's attacks behind the same interface
    suites.py      the evaluation's suites ("paper", "strong"): attack_suite, describe_suite

Re-exported here: the threat models, PGD and the multi-perturbation attacks (torch only). The
evaluation's modules (apgd, adaptive, crosscheck, suites) import psat_core.metrics and
third-party attack libraries: import them by their module.
"""

from psat_core.attacks.multi import MSD, WorstCase
from psat_core.attacks.pgd import (
    PGD,
    AttackResult,
    ThreatAttack,
    WorstIterate,
    adversarial_examples,
    ascend,
    cross_entropy,
    eval_mode,
    loss_and_wrong,
    make_attacks,
)
from psat_core.attacks.threat import (
    THREAT_MODELS,
    L1Ball,
    L2Ball,
    LinfBall,
    ThreatModel,
    per_sample,
    project_l1_ball,
    threat_model,
)

__all__ = [
    "ThreatModel",
    "LinfBall",
    "L2Ball",
    "L1Ball",
    "THREAT_MODELS",
    "threat_model",
    "project_l1_ball",
    "per_sample",
    "AttackResult",
    "WorstIterate",
    "ThreatAttack",
    "ascend",
    "cross_entropy",
    "loss_and_wrong",
    "PGD",
    "WorstCase",
    "MSD",
    "adversarial_examples",
    "make_attacks",
    "eval_mode",
]
