"""psat_core.attacks: projections (property tests), PGD / WorstCase / MSD behaviour, strength
against torchattacks, configuration validation and per-dataset defaults."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic as make_synthetic
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from psat_core.attacks import (
    MSD,
    PGD,
    THREAT_MODELS,
    L1Ball,
    L2Ball,
    LinfBall,
    WorstCase,
    adversarial_examples,
    eval_mode,
    make_attacks,
    project_l1_ball,
    threat_model,
)
from psat_core.settings import DATASETS, NORMS, AttackConfig, attack_defaults

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_CLASSES = 4
SHAPE = (1, 8, 8)  # 64 coordinates per example


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_synthetic(n, seed, NUM_CLASSES, noise=0.15)


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, NUM_CLASSES),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int = 200) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(iters):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = train(make_mlp(), *synthetic(2000, seed=1))
    x, y = synthetic(600, seed=2)
    return model, x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad(), eval_mode(model):
        return (model(x).argmax(1) == y).float().mean().item()


def predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return model(x).argmax(1)


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return F.cross_entropy(model(x), y, reduction="none")


def test_trained_model_is_accurate(trained):
    model, x, y = trained
    assert accuracy(model, x, y) > 0.97


# --------------------------------------------------------------------------- projections


@st.composite
def batches(draw, dtype=torch.float64):
    """Random (B, d) tensors, sometimes with many ties and exact zeros."""
    b, d = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.01, 10.0))
    v = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale
    if draw(st.booleans()):
        v = (v / scale * 2).round() * (scale / 2)  # ties
    return v


def reference_l1_projection(v: np.ndarray, eps: float, x: np.ndarray | None = None) -> np.ndarray:
    """Bisection on the soft-threshold theta, in float64; with ``x``, inside the box
    ``0 <= x + w <= 1`` (each coordinate capped at the box bound on its side)."""
    cap = np.full_like(v, np.inf) if x is None else np.where(v >= 0, 1 - x, x)
    out = np.sign(v) * np.minimum(np.abs(v), cap)
    for i, row in enumerate(v):
        a, c = np.abs(row), cap[i]

        def f(theta, a=a, c=c):
            return np.minimum(np.maximum(a - theta, 0), c).sum()

        if f(0.0) <= eps:
            continue
        lo, hi = 0.0, float(a.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > eps else (lo, mid)
        out[i] = np.sign(row) * np.minimum(np.maximum(a - (lo + hi) / 2, 0), c)
    return out


@settings(max_examples=150, deadline=None)
@given(v=batches(), eps=st.floats(0.01, 20.0))
def test_project_l1_ball_matches_reference(v, eps):
    w = project_l1_ball(v, eps)
    ref = torch.from_numpy(reference_l1_projection(v.numpy(), eps))
    assert w.shape == v.shape and w.dtype == v.dtype
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-9 * max(1.0, float(v.abs().max())))
    assert (w.abs().sum(1) <= eps * (1 + 1e-12) + 1e-12).all()
    inside = v.abs().sum(1) <= eps
    assert torch.equal(w[inside], v[inside])  # rows inside are unchanged, bit for bit
    torch.testing.assert_close(project_l1_ball(w, eps), w, rtol=0, atol=1e-9 * max(1.0, eps))


@settings(max_examples=150, deadline=None)
@given(v=batches(), eps=st.floats(0.01, 20.0), seed=st.integers(0, 2**31 - 1))
def test_project_l1_ball_in_the_box_is_exact(v, eps, seed):
    x = torch.rand(v.shape, generator=torch.Generator().manual_seed(seed), dtype=v.dtype)
    x[:, ::3] = x[:, ::3].round()  # saturated pixels
    w = project_l1_ball(v, eps, lower=-x, upper=1 - x)
    ref = torch.from_numpy(reference_l1_projection(v.numpy(), eps, x.numpy()))
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-9 * max(1.0, float(v.abs().max())))
    assert ((x + w) >= 0).all() and ((x + w) <= 1).all()
    # clipping after the ball's projection is feasible too, but never closer to v
    clipped = (x + project_l1_ball(v, eps)).clamp(0, 1) - x
    assert ((w - v).norm(dim=1) <= (clipped - v).norm(dim=1) + 1e-9).all()
    assert (w.abs().sum(1) >= clipped.abs().sum(1) - 1e-9).all()  # and uses as much budget


@settings(max_examples=50, deadline=None)
@given(v=batches(dtype=torch.float32), eps=st.floats(0.05, 20.0))
def test_project_l1_ball_float32_within_rounding(v, eps):
    w = project_l1_ball(v, eps)
    ref = torch.from_numpy(reference_l1_projection(v.double().numpy(), eps)).float()
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(v.abs().max())))
    assert (w.abs().sum(1) <= eps * (1 + 1e-5)).all()


@st.composite
def projection_cases(draw):
    norm = draw(st.sampled_from(NORMS))
    eps = draw(st.floats(0.01, 8.0))
    b = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.rand(b, 2, 3, 3, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x = x.round()  # pixels saturated at 0 and 1
    delta = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64) * draw(st.floats(0.0, 5.0))
    return threat_model(norm, eps), x, delta


@settings(max_examples=200, deadline=None)
@given(case=projection_cases())
def test_projection_lands_in_ball_and_box_and_is_idempotent(case):
    threat, x, delta = case
    p = threat.project(delta, x)
    assert (threat.distance(p) <= threat.eps * (1 + 1e-9) + 1e-12).all()
    assert ((x + p) >= -1e-12).all() and ((x + p) <= 1 + 1e-12).all()
    torch.testing.assert_close(threat.project(p, x), p, rtol=0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(case=projection_cases())
def test_projection_keeps_feasible_points(case):
    threat, x, delta = case
    # shrink delta into the ball, then keep only coordinates that stay inside the box
    inside = delta * (0.9 * threat.eps / threat.distance(delta).clamp_min(1e-12)).clamp(max=1).view(
        -1, 1, 1, 1
    )
    inside = torch.where(
        ((x + inside) >= 0) & ((x + inside) <= 1), inside, torch.zeros_like(inside)
    )
    torch.testing.assert_close(threat.project(inside, x), inside, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(case=projection_cases(), step_size=st.floats(0.01, 2.0))
def test_step_is_steepest_ascent_of_the_right_length(case, step_size):
    threat, x, grad = case
    if threat.distance(grad).min() == 0:
        return
    delta = torch.zeros_like(x)
    move = threat.step(delta, grad, step_size) - delta  # no x: nothing saturated
    # ascent direction (signs: products of subnormal gradients underflow to 0)
    assert (move.flatten(1).mul(grad.flatten(1).sign()).sum(1) > 0).all()
    torch.testing.assert_close(threat.distance(move), torch.full_like(move[:, 0, 0, 0], step_size))


def test_l1_step_moves_top_coordinates_and_skips_saturated_pixels():
    threat = L1Ball(eps=5.0, sparsity=0.86)  # k = ceil(0.14 * 64) = 9 coordinates per step
    assert threat.coordinates_per_step(64) == 9
    assert L1Ball(5.0).coordinates_per_step(64) == L1Ball.MIN_COORDINATES  # not 1% = 1 pixel
    assert L1Ball(5.0).coordinates_per_step(3072) == 31
    grad = torch.linspace(-1, 1, 64).view(1, *SHAPE)  # largest |grad| at both ends
    x = torch.full((1, *SHAPE), 0.5)
    x.view(-1)[-3:] = 1.0  # the three largest positive gradients point out of the box
    x.view(-1)[:2] = 0.0  # the two most negative too
    move = threat.step(torch.zeros_like(x), grad, 1.0, x).view(-1)
    assert move.abs().sum().item() == pytest.approx(1.0)
    moved = set(move.nonzero().squeeze(1).tolist())
    assert len(moved) == 9
    assert not moved & {61, 62, 63, 0, 1}  # saturated pixels are skipped
    assert moved == {2, 3, 4, 5, 6, 57, 58, 59, 60}  # the next-largest |grad| instead
    assert torch.equal(move[move != 0].sign(), grad.view(-1)[move != 0].sign())


def test_threat_model_registry_and_random_starts_are_feasible():
    assert set(THREAT_MODELS) == set(NORMS)
    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8)
    x[:, 0] = 1.0  # saturated channel
    for norm, eps in (("linf", 0.1), ("l2", 1.0), ("l1", 5.0)):
        threat = threat_model(norm, eps)
        assert isinstance(threat, THREAT_MODELS[norm]) and threat.norm == norm
        delta = threat.random_start(x)
        assert (threat.distance(delta) <= eps * (1 + 1e-5)).all()
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
        assert (delta != 0).any()
    sparse = L1Ball(5.0).random_start(x)  # 192 coords: k = max(2, MIN_COORDINATES) = 8
    assert ((sparse != 0).flatten(1).sum(1) <= L1Ball.MIN_COORDINATES).all()


# --------------------------------------------------------------------------- PGD


@pytest.mark.parametrize(
    ("threat", "steps", "step_size", "max_accuracy"),
    [(LinfBall(0.12), 10, 0.03, 0.5), (L2Ball(1.0), 10, 0.25, 0.3), (L1Ball(4.0), 20, 1.0, 0.7)],
)
def test_pgd_lowers_accuracy_within_budget(trained, threat, steps, step_size, max_accuracy):
    model, x, y = trained
    torch.manual_seed(0)
    x_adv = PGD(threat, steps, step_size)(model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert accuracy(model, x_adv, y) < max_accuracy < accuracy(model, x, y)
    assert (threat.distance(x_adv - x) <= threat.eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize(
    ("threat", "step_size"), [(LinfBall(0.12), 0.03), (L2Ball(1.0), 0.25), (L1Ball(4.0), 1.0)]
)
def test_last_iterate_is_the_unscored_final_step(trained, threat, step_size):
    model, x, y = trained
    model.train()
    try:
        pgd = PGD(threat, 10, step_size, random_start=False)
        x_last = pgd.last_iterate(model, x, y)
        assert model.training and all(p.grad is None for p in model.parameters())
        assert (threat.distance(x_last - x) <= threat.eps * (1 + 1e-5)).all()
        assert x_last.min() >= 0 and x_last.max() <= 1
        assert accuracy(model, x_last, y) < accuracy(model, x, y) - 0.2
        # same trajectory (no random start): the kept worst iterate is never weaker, per example
        worst = pgd.perturb(model, x, y)
        last_loss = per_example_loss(model, x_last, y)
        last_wrong = predictions(model, x_last) != y
        assert (worst.misclassified >= last_wrong).all()
        both = worst.misclassified == last_wrong
        assert (worst.loss[both] >= last_loss[both] - 1e-5).all()
    finally:
        model.eval()


def test_l1_perturbations_are_sparse(trained):
    model, x, y = trained
    torch.manual_seed(0)
    steps = 3
    x_adv = PGD(L1Ball(4.0), steps, 1.5)(model, x, y)
    nonzero = ((x_adv - x).abs() > 1e-6).flatten(1).sum(1)
    # k = MIN_COORDINATES of 64 coordinates per step and in the random start
    assert nonzero.max().item() <= L1Ball.MIN_COORDINATES * (steps + 1) < 64
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


def test_pgd_restores_training_mode_and_leaves_parameters_alone(trained):
    model, x, y = trained
    model.train()
    model[2].eval()  # a frozen BatchNorm inside a training model must stay frozen
    for p in model.parameters():
        p.grad = None
    stats = model[2].running_mean.clone()
    weights = [p.detach().clone() for p in model.parameters()]
    try:
        PGD(L2Ball(0.5), 3, 0.2)(model, x[:64], y[:64])
        assert model.training and model[4].training and not model[2].training
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(model[2].running_mean, stats)
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))

        model.train()  # BatchNorm in training mode would update its running stats...
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        PGD(LinfBall(0.1), 3, 0.05)(model, x[:64], y[:64])
        assert torch.equal(model[2].running_mean, stats)  # ...but the attack runs in eval mode
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    finally:
        for p in model.parameters():
            p.grad = None
        model.eval()


def test_pgd_restores_mode_when_the_model_raises():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(LinfBall(0.1), 2, 0.05)(model, torch.rand(2, 3), torch.zeros(2, dtype=torch.long))
    assert model.training


def test_pgd_runs_under_no_grad(trained):
    model, x, y = trained
    with torch.no_grad():
        x_adv = PGD(LinfBall(0.12), 5, 0.03, random_start=False)(model, x[:100], y[:100])
    assert accuracy(model, x_adv, y[:100]) < accuracy(model, x[:100], y[:100])


def test_pgd_never_returns_a_weaker_iterate(trained):
    """Without random start the 4-step path is a prefix of the 10-step one: the longer run's
    worst iterate is at least as bad for every example (misclassified first, then loss)."""
    model, x, y = trained
    threat = LinfBall(0.08)
    short = PGD(threat, 4, 0.02, random_start=False).perturb(model, x, y)
    long = PGD(threat, 10, 0.02, random_start=False).perturb(model, x, y)
    assert (long.misclassified >= short.misclassified).all()
    same = long.misclassified == short.misclassified
    assert (long.loss[same] >= short.loss[same] - 1e-6).all()
    # the reported loss and misclassification describe the returned x_adv
    torch.testing.assert_close(
        long.loss, per_example_loss(model, long.x_adv, y), rtol=1e-4, atol=1e-5
    )
    with torch.no_grad():
        assert torch.equal(long.misclassified, model(long.x_adv).argmax(1) != y)
    # iterate 0 (the clean point) is a candidate: the attack never lowers the loss
    clean = per_example_loss(model, x, y)
    assert (long.loss[~long.misclassified] >= clean[~long.misclassified] - 1e-6).all()


def test_restarts_merge_per_example(trained):
    model, x, y = trained
    threat = L2Ball(0.6)
    torch.manual_seed(3)
    one = PGD(threat, 3, 0.2, restarts=1).perturb(model, x, y)
    torch.manual_seed(3)  # same first restart
    three = PGD(threat, 3, 0.2, restarts=3).perturb(model, x, y)
    assert (three.misclassified >= one.misclassified).all()
    same = three.misclassified == one.misclassified
    assert (three.loss[same] >= one.loss[same] - 1e-6).all()
    assert (three.loss > one.loss + 1e-4).any()  # later restarts did find worse points


def test_pgd_attacks_an_ensemble_module(trained):
    model, x, y = trained
    torch.manual_seed(1)
    other = train(make_mlp(), *synthetic(2000, seed=5), iters=100)

    class Mean(nn.Module):
        def __init__(self, members):
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, inputs):
            return torch.stack([m(inputs) for m in self.members]).mean(0)

    ensemble = Mean([model, other])
    x_adv = PGD(LinfBall(0.12), 10, 0.03)(ensemble, x, y)
    assert accuracy(ensemble, x_adv, y) < accuracy(ensemble, x, y) - 0.3


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_at_least_as_strong_as_torchattacks(trained, norm):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    eps, steps = {"linf": 0.1, "l2": 0.8}[norm], 10
    alpha = eps / 4
    ours = PGD(threat_model(norm, eps), steps, alpha, random_start=True)
    if norm == "linf":
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    else:
        theirs = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    torch.manual_seed(0)
    ours_acc = accuracy(model, ours(model, x, y), y)
    torch.manual_seed(0)
    theirs_acc = accuracy(model, theirs(x, y), y)
    assert 0.05 < theirs_acc < 0.95  # a budget where strength can differ
    assert ours_acc <= theirs_acc + 0.01


# --------------------------------------------------------------------------- multi-perturbation


def deterministic_attacks() -> dict[str, PGD]:
    return {
        "linf": PGD(LinfBall(0.08), 5, 0.02, random_start=False),
        "l2": PGD(L2Ball(0.6), 5, 0.15, random_start=False),
        "l1": PGD(L1Ball(2.6), 10, 1.0, random_start=False),
    }


def test_worst_case_keeps_the_highest_loss_attack_per_example(trained):
    model, x, y = trained
    attacks = deterministic_attacks()
    candidates = adversarial_examples(attacks, model, x, y)
    assert list(candidates) == list(attacks)
    losses = torch.stack([per_example_loss(model, c, y) for c in candidates.values()])
    x_adv, choice = WorstCase(attacks).attack_with_choice(model, x, y)
    assert choice.dtype == torch.long and choice.shape == y.shape
    assert len(set(choice.tolist())) > 1  # different norms win on different examples
    torch.testing.assert_close(choice, losses.argmax(0))
    stacked = torch.stack(list(candidates.values()))
    assert torch.equal(x_adv, stacked[choice, torch.arange(len(y))])
    chosen_loss = per_example_loss(model, x_adv, y)
    assert (chosen_loss >= losses.max(0).values - 1e-5).all()
    assert torch.equal(WorstCase(attacks)(model, x, y), x_adv)


def test_msd_step_keeps_the_highest_loss_candidate(trained):
    """One MSD step from 0: per example, the projected step of the norm with the highest loss."""
    model, x, y = trained
    # radii chosen so that different norms win on different examples of this model
    threats = {"linf": LinfBall(0.09), "l2": L2Ball(0.6), "l1": L1Ball(3.0, sparsity=0.9)}
    sizes = {"linf": 0.09, "l2": 0.6, "l1": 3.0}
    delta = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(x + delta), y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    candidates = [
        t.project(t.step(delta.detach(), grad, sizes[n], x), x) for n, t in threats.items()
    ]
    losses = torch.stack([per_example_loss(model, x + c, y) for c in candidates])

    x_adv, choice = MSD(threats, 1, sizes, random_start=False).attack_with_choice(model, x, y)
    torch.testing.assert_close(choice, losses.argmax(0))
    assert len(set(choice.tolist())) > 1
    expected = (x + torch.stack(candidates)[choice, torch.arange(len(y))]).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)


@pytest.mark.parametrize("random_start", [True, False])
def test_msd_stays_in_the_union_and_lowers_accuracy(trained, random_start):
    model, x, y = trained
    threats = {"linf": LinfBall(0.08), "l2": L2Ball(0.6), "l1": L1Ball(3.0)}
    sizes = {"linf": 0.02, "l2": 0.15, "l1": 1.0}
    torch.manual_seed(0)
    msd = MSD(threats, 20, sizes, random_start=random_start)
    x_adv, choice = msd.attack_with_choice(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    for i, threat in enumerate(threats.values()):
        rows = choice == i
        assert (threat.distance(x_adv[rows] - x[rows]) <= threat.eps * (1 + 1e-5)).all()
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.1
    assert model.training is False


def test_multi_perturbation_inputs_are_validated():
    with pytest.raises(ValueError, match="attacks"):
        WorstCase({})
    with pytest.raises(ValueError, match="step_sizes"):
        MSD({"linf": LinfBall(0.1)}, 5, {"l2": 0.1})
    with pytest.raises(ValueError, match="steps"):
        MSD({"linf": LinfBall(0.1)}, 0, {"linf": 0.1})


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("norm", "l3"),
        ("eps", -0.1),
        ("eps", 0.0),
        ("eps", math.nan),
        ("steps", 0),
        ("steps", 2.5),
        ("step_size", 0.0),
        ("restarts", 0),
    ],
)
def test_attack_config_rejects_bad_values_naming_the_field(field, value):
    kwargs = {"norm": "linf", "eps": 0.1, "steps": 5, "step_size": 0.02, field: value}
    with pytest.raises(ValueError, match=rf"AttackConfig\.{field} must be .*got {value!r}"):
        AttackConfig(**kwargs)


def test_threat_models_and_pgd_reject_bad_values():
    with pytest.raises(ValueError, match=r"unknown norm 'l3'; allowed: linf, l2, l1"):
        threat_model("l3", 0.1)
    with pytest.raises(ValueError, match=r"LinfBall\.eps"):
        LinfBall(-1.0)
    with pytest.raises(ValueError, match=r"L1Ball\.sparsity"):
        L1Ball(1.0, sparsity=1.0)
    with pytest.raises(ValueError, match=r"PGD\.steps"):
        PGD(LinfBall(0.1), steps=0, step_size=0.01)
    with pytest.raises(ValueError, match=r"PGD\.step_size"):
        PGD(LinfBall(0.1), steps=1, step_size=-0.01)
    with pytest.raises(ValueError, match=r"PGD\.threat"):
        PGD("linf", steps=1, step_size=0.01)


def test_from_config_builds_the_described_attack():
    cfg = AttackConfig("l1", eps=12.0, steps=20, step_size=1.0, restarts=2, random_start=False)
    pgd = PGD.from_config(cfg)
    assert isinstance(pgd.threat, L1Ball) and pgd.eps == 12.0 and pgd.norm == "l1"
    assert (pgd.steps, pgd.step_size, pgd.restarts, pgd.random_start) == (20, 1.0, 2, False)


@pytest.mark.parametrize("dataset", DATASETS)
def test_attack_defaults_cover_every_norm_and_eval_is_stronger(dataset):
    train_cfg, eval_cfg = attack_defaults(dataset, "train"), attack_defaults(dataset, "eval")
    assert list(train_cfg) == list(eval_cfg) == list(NORMS)
    for norm in NORMS:
        t, e = train_cfg[norm], eval_cfg[norm]
        assert t.norm == e.norm == norm and t.eps == e.eps
        assert e.steps > t.steps and e.restarts > t.restarts
        assert t.steps * t.step_size >= t.eps  # a run can cross the ball
    assert set(make_attacks(eval_cfg)) == set(NORMS)


def test_image_dataset_defaults_follow_the_literature():
    for dataset in ("cifar10", "svhn", "tinyimagenet"):
        cfg = attack_defaults(dataset, "train")
        assert (cfg["linf"].eps, cfg["l2"].eps, cfg["l1"].eps) == (8 / 255, 0.5, 12.0)
        assert [cfg[n].steps for n in NORMS] == [10, 10, 20]
        assert [c.steps for c in attack_defaults(dataset, "eval").values()] == [50, 50, 100]


def test_attack_defaults_overrides_and_errors():
    cfg = attack_defaults("cifar10", "eval", {"l1": {"steps": 7, "restarts": 1}})
    assert (cfg["l1"].steps, cfg["l1"].restarts) == (7, 1)
    assert cfg["linf"] == attack_defaults("cifar10", "eval")["linf"]
    assert attack_defaults("cifar10", "eval")["l1"].steps == 100  # the table is not mutated
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; known: cifar10, svhn"):
        attack_defaults("mnist", "train")
    with pytest.raises(ValueError, match=r"unknown attack phase 'test'"):
        attack_defaults("digits", "test")
    with pytest.raises(ValueError, match=r"AttackConfig\.eps must be a number > 0"):
        attack_defaults("digits", "train", {"linf": {"eps": -1.0}})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['epsilon'\]"):
        attack_defaults("digits", "train", {"linf": {"epsilon": 0.1}})
    with pytest.raises(ValueError, match=r"unknown norm 'l0'"):
        attack_defaults("digits", "train", {"l0": {"eps": 1.0}})
