"""psat_core.attacks.apgd and psat_core.attacks.suites: APGD / APGD-T / ℓ1-APGD against
torchattacks and foolbox at the same budget, the transfer attack on an ensemble, and the
evaluation suites."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from helpers import synthetic
from torch import nn

from psat_core.attacks import PGD, eval_mode, threat_model
from psat_core.attacks.adaptive import MemberTransfer
from psat_core.attacks.apgd import APGD, dlr_loss
from psat_core.attacks.crosscheck import FoolboxSparseL1
from psat_core.attacks.suites import SUITES, attack_suite
from psat_core.ensemble import PSATEnsemble
from psat_core.settings import attack_defaults

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 10
RADII = {"linf": 0.1, "l2": 0.8, "l1": 3.0}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, CLASSES))
    x, y = synthetic(3000, seed=10 + seed, classes=CLASSES, noise=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(300):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_and_data():
    x, y = synthetic(300, seed=99, classes=CLASSES, noise=0.2)
    return mlp(0), x, y


def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return model(x_adv).argmax(1) == y


def test_dlr_loss_matches_its_definition():
    logits = torch.randn(64, CLASSES, generator=torch.Generator().manual_seed(0))
    y = torch.randint(CLASSES, (64,), generator=torch.Generator().manual_seed(1))
    z = logits.sort(dim=1, descending=True).values
    z_y = logits[torch.arange(64), y]
    best_other = torch.stack([logits[i][torch.arange(CLASSES) != y[i]].max() for i in range(64)])
    torch.testing.assert_close(dlr_loss(logits, y), -(z_y - best_other) / (z[:, 0] - z[:, 2]))
    t = (y + 1) % CLASSES
    z_t = logits[torch.arange(64), t]
    targeted = -(z_y - z_t) / (z[:, 0] - (z[:, 2] + z[:, 3]) / 2)
    torch.testing.assert_close(dlr_loss(logits, y, t), targeted)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("targets", [0, 3])
def test_apgd_stays_in_the_ball_and_box_and_is_seeded(model_and_data, norm, targets):
    model, x, y = model_and_data
    threat = threat_model(norm, RADII[norm])
    x_adv = APGD(threat, steps=10, targets=targets, seed=3)(model, x[:64], y[:64])
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    assert (threat.distance((x_adv - x[:64]).double()) <= threat.eps * (1 + 1e-5)).all()
    again = APGD(threat, steps=10, targets=targets, seed=3)(model, x[:64], y[:64])
    assert torch.equal(x_adv, again)  # same seed, same examples


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_is_at_least_as_strong_as_torchattacks(model_and_data, norm):
    model, x, y = model_and_data
    eps, steps, name = RADII[norm], 50, {"linf": "Linf", "l2": "L2"}[norm]
    ours = robust(model, APGD(threat_model(norm, eps), steps)(model, x, y), y)
    ours &= robust(model, APGD(threat_model(norm, eps), steps, targets=9)(model, x, y), y)
    ce = torchattacks.APGD(model, norm=name, eps=eps, steps=steps, seed=0)
    dlr_t = torchattacks.APGDT(model, norm=name, eps=eps, steps=steps, n_classes=CLASSES, seed=0)
    theirs = robust(model, ce(x, y), y) & robust(model, dlr_t(x, y), y)
    clean = robust(model, x, y).float().mean().item()
    assert 0.1 < theirs.float().mean().item() < clean  # a case where the attack matters
    assert ours.float().mean().item() <= theirs.float().mean().item() + 1 / len(y)


def test_l1_apgd_beats_l1_pgd_and_foolbox(model_and_data):
    model, x, y = model_and_data
    threat = threat_model("l1", RADII["l1"])
    # AutoAttack's ℓ1 budget: 5 restarts (a single run of either varies by a few points)
    ours = robust(model, APGD(threat, 50, restarts=5)(model, x, y), y).float().mean().item()
    pgd = robust(model, PGD(threat, 50, 1.0, restarts=5)(model, x, y), y).float().mean().item()
    foolbox = robust(model, FoolboxSparseL1(threat, 50, 1.0)(model, x, y), y)
    assert ours < pgd and ours < foolbox.float().mean().item()


def test_transfer_keeps_the_members_examples_that_fool_the_ensemble(model_and_data):
    _, x, y = model_and_data
    ensemble = PSATEnsemble([mlp(1), mlp(2)]).eval()
    pgd = PGD(threat_model("l2", RADII["l2"]), 10, 0.2)
    x_adv = MemberTransfer([pgd])(ensemble, x, y)
    assert (threat_model("l2", RADII["l2"]).distance(x_adv - x) <= RADII["l2"] + 1e-5).all()
    for member in ensemble.members:  # each member's own examples, through the ensemble
        torch.manual_seed(0)
        alone = robust(ensemble, pgd(member, x, y), y).float().mean()
        assert robust(ensemble, x_adv, y).float().mean() <= alone + 0.02


def test_suites_name_their_attacks():
    configs = attack_defaults("digits", "eval")
    assert set(attack_suite("paper", configs, ensemble=True)) == {f"{n}/pgd" for n in RADII}
    strong = attack_suite("strong", configs, ensemble=False)
    for norm in RADII:
        assert {f"{norm}/pgd", f"{norm}/apgd-ce", f"{norm}/apgd-t"} <= set(strong)
        assert f"{norm}/transfer" not in strong
        assert f"{norm}/transfer" in attack_suite("strong", configs, ensemble=True)
    assert strong["l1/apgd-ce"].restarts == 5 and strong["l2/apgd-t"].targets == 9
    with pytest.raises(ValueError, match=f"unknown evaluation suite 'auto'.*{SUITES[0]}"):
        attack_suite("auto", configs, ensemble=False)
