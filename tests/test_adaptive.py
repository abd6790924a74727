"""Adaptive attacks on the lowest-entropy gate, and the third-party cross-check wrappers."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic
from torch import nn

from psat_core.attacks import PGD, LinfBall
from psat_core.attacks.adaptive import (
    ConfidentWrongMember,
    GatePGD,
    MemberTransfer,
    SoftGate,
    adaptive_attacks,
    member_examples,
)
from psat_core.attacks.crosscheck import crosscheck_attacks, square_attacks
from psat_core.attacks.suites import attack_suite
from psat_core.ensemble import PSATEnsemble, entropy
from psat_core.metrics import attack_seed, evaluate_per_sample, summarize
from psat_core.settings import AttackConfig, attack_defaults

EPS = 0.1


class Affine(nn.Module):
    def __init__(self, weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def trap_ensemble() -> PSATEnsemble:
    """Two members on 4 pixels, 3 classes, true class 0 at x0 = 0.5.

    ``honest`` says class 0 with moderate entropy and barely depends on x (its tiny weight on
    pixel 0 is positive, so loss ascent through it moves pixel 0 down). ``trap`` is uniform
    (maximal entropy, never chosen) at x0, but pixel 0 raised by about 0.07 makes it confident
    in class 2: the gate then picks it and the ensemble is wrong, within ε = 0.1.
    """
    honest = Affine([[0.01, -0.01, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], [1.5, 0.5, 0.0])
    trap = Affine([[0, 0, 0, 0], [0, 0, 0, 0], [20.0, 0, 0, 0]], [0.0, 0.0, -10.0])
    return PSATEnsemble([honest, trap], names=["honest", "trap"]).eval()


def _accuracy(model, attack, x, y) -> float:
    return summarize(evaluate_per_sample(model, x, y, {"linf/x": attack}))["linf"]


def test_attacks_that_know_the_gate_beat_pgd_through_the_argmin():
    ensemble = trap_ensemble()
    x, y = torch.full((4, 4), 0.5), torch.zeros(4, dtype=torch.long)
    entropies = entropy(ensemble.member_logits(x))
    assert bool((entropies[0] < entropies[1]).all())  # the honest member answers at x0
    assert bool((ensemble(x).argmax(1) == 0).all())
    pgd = PGD(LinfBall(EPS), steps=10, step_size=EPS / 4, random_start=False)
    assert _accuracy(ensemble, pgd, x, y) == 1.0  # the argmin's gradient never finds the trap
    assert _accuracy(ensemble, GatePGD(pgd), x, y) == 0.0
    assert _accuracy(ensemble, ConfidentWrongMember(LinfBall(EPS), 10, EPS / 4), x, y) == 0.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_in_the_protocol_breaks_no_fewer_images_than_the_librarys_own_run(norm):
    """The evaluator's Square (seeded per batch) against torchattacks' Square called directly
    with that seed on the same clean-correct images: every image the library breaks, ours
    breaks too."""
    import torchattacks

    torch.manual_seed(0)
    x, _ = synthetic(24, seed=4)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 4)) for _ in range(3)]
    ensemble = PSATEnsemble(members).eval()
    y = ensemble(x).argmax(1)  # every image clean-correct
    configs = {norm: attack_defaults("digits", "eval")[norm]}
    attacks = square_attacks(configs, queries=30)
    ours = evaluate_per_sample(ensemble, x, y, attacks, seed=5)
    name = f"{norm}/torchattacks.Square"
    clean = ours.correct["clean"]
    library = torchattacks.Square(ensemble, norm={"linf": "Linf", "l2": "L2"}[norm],
                                  eps=configs[norm].eps, n_queries=30, n_restarts=1,
                                  loss="margin", seed=attack_seed(5, name, 0))  # fmt: skip
    with torch.no_grad():
        broken_by_library = ensemble(library(x[clean], y[clean])).argmax(1) != y[clean]
    broken_by_ours = ~ours.correct[name][clean]
    assert broken_by_library.any()  # it does something on these undefended models
    assert not (broken_by_library & ~broken_by_ours).any()
    assert int(broken_by_ours.sum()) >= int(broken_by_library.sum())


def test_soft_gate_keeps_the_ensembles_output_and_passes_a_gradient():
    ensemble = trap_ensemble()
    x = torch.rand(5, 4, requires_grad=True)
    out = SoftGate(ensemble, temperature=0.1)(x)
    assert torch.equal(out.detach(), ensemble(x).detach())
    (grad,) = torch.autograd.grad(out[:, 2].sum(), x)
    assert grad[:, 0].abs().min() > 0  # the trap's pixel moves the gate
    with pytest.raises(ValueError, match="temperature"):
        SoftGate(ensemble, temperature=0.0)


def test_adaptive_and_third_party_attacks_stay_in_the_ball_and_count_under_their_norm():
    torch.manual_seed(0)
    x, y = synthetic(24, seed=3)
    members = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 4)),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)),
    ]
    ensemble = PSATEnsemble(members).eval()
    y = ensemble(x).argmax(1)  # every point clean-correct, so every attack runs on all of them
    configs = {
        n: AttackConfig(n, c.eps, 5, c.step_size, restarts=1, random_start=True)
        for n, c in attack_defaults("digits", "eval").items()
    }
    attacks = {f"{n}/pgd": PGD.from_config(c) for n, c in configs.items()}
    attacks |= crosscheck_attacks(configs) | adaptive_attacks(configs)
    assert {"linf/torchattacks.APGD", "l2/torchattacks.PGDL2", "l1/foolbox.SparseL1Descent"} <= set(
        attacks
    )
    # the evaluator's sanity checks reject any x_adv outside its attack's ε-ball or [0, 1]
    row = summarize(evaluate_per_sample(ensemble, x, y, attacks))
    for name in attacks:
        norm = name.split("/")[0]
        assert row[norm] <= row[name] <= row["clean"]
        assert row["max"] <= row[norm]
    assert row["avg"] == pytest.approx((row["linf"] + row["l2"] + row["l1"]) / 3)
    assert row["linf"] < 1.0  # the attacks do something on an undefended model


def small_ensemble(members: int) -> PSATEnsemble:
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(members)]
    return PSATEnsemble(nets, names=[f"m{i}" for i in range(members)]).eval()


def test_the_gate_attack_is_at_least_as_strong_as_plain_pgd():
    ensemble = small_ensemble(3)
    x, y = torch.rand(64, 16), torch.randint(0, 3, (64,))
    pgd = PGD(LinfBall(EPS), steps=5, step_size=EPS / 4)
    torch.manual_seed(1)
    plain = ensemble(pgd(ensemble, x, y)).argmax(1) != y
    torch.manual_seed(1)
    gate = ensemble(GatePGD(pgd)(ensemble, x, y)).argmax(1) != y
    assert plain.any() and not (plain & ~gate).any()


def test_a_one_member_ensemble_scores_like_its_member():
    ensemble = small_ensemble(1)
    x, y = torch.rand(64, 16), torch.randint(0, 3, (64,))
    configs = {
        "linf": AttackConfig("linf", EPS, 5, EPS / 4),
        "l1": AttackConfig("l1", 1.0, 5, 0.5),
    }
    member = evaluate_per_sample(
        ensemble.members[0], x, y, attack_suite("paper", configs, ensemble=False), seed=7
    )
    whole = evaluate_per_sample(
        ensemble, x, y, attack_suite("paper", configs, ensemble=True), seed=7
    )
    assert summarize(member) == summarize(whole)


def test_the_transfer_scores_the_member_rows_examples_as_if_it_had_crafted_them():
    """Reusing the member rows' evaluation is not weaker than crafting again: with
    deterministic crafters, `member_examples` (the evaluation's examples where it attacked,
    crafted now elsewhere) are each crafter's examples on every image, and the transfer attack
    that scores them returns what the one crafting in place returns."""
    ensemble = small_ensemble(3)
    x, y = torch.rand(48, 16), torch.randint(0, 3, (48,))
    crafters = {
        "linf/pgd": PGD(LinfBall(EPS), steps=3, step_size=EPS / 2, random_start=False),
        "linf/pgd-long": PGD(LinfBall(EPS), steps=8, step_size=EPS / 4, random_start=False),
    }
    lent = []
    for member in ensemble.members:
        kept = evaluate_per_sample(member, x, y, crafters, keep=list(crafters))
        attacked = kept.attacked("linf/pgd-long")
        assert attacked.any() and not attacked.all()  # both parts of member_examples run
        assert torch.equal(kept.examples["linf/pgd-long"][~attacked], x[~attacked])
        examples = member_examples(member, x, y, kept, crafters)
        for found, crafter in zip(examples, crafters.values(), strict=True):
            assert torch.allclose(found, crafter(member, x, y), atol=1e-6)
        lent.append(examples)
    reused = MemberTransfer(list(crafters.values()), torch.cat(lent))
    in_place = MemberTransfer(list(crafters.values()))
    index = torch.arange(0, 48, 3)
    assert reused.indexed and not in_place.indexed
    found = reused(ensemble, x[index], y[index], index=index)
    assert torch.allclose(found, in_place(ensemble, x[index], y[index]), atol=1e-6)
    assert (ensemble(found).argmax(1) != y[index]).any()
    with pytest.raises(ValueError, match="index"):
        reused(ensemble, x[index], y[index])
    with pytest.raises(ValueError, match=r"keep names no attack.*linf/apgd"):
        evaluate_per_sample(ensemble, x, y, crafters, keep=["linf/apgd"])
