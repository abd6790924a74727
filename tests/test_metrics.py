"""psat_core.metrics: Table 1's trade-off, the evaluation protocol and its sanity checks."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic as make_synthetic
from torch import nn

from psat_core.attacks import PGD, L1Ball, L2Ball, LinfBall, make_attacks
from psat_core.attacks.suites import SUITES, attack_suite, paper_view
from psat_core.metrics import (
    TABLE1_KEYS,
    SanityCheckError,
    evaluate_per_sample,
    evaluate_robustness,
    summarize,
    trade_off,
)
from psat_core.settings import attack_defaults

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_CLASSES = 4


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_synthetic(n, seed, NUM_CLASSES, noise=0.2)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
    )
    x_train, y_train = synthetic(2000, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(150):
        idx = torch.arange(i * 128, (i + 1) * 128) % len(x_train)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    x, y = synthetic(300, seed=2)
    return model.eval(), x, y


def attacks(random_start: bool = True) -> dict[str, PGD]:
    return {
        "linf": PGD(LinfBall(0.1), 10, 0.025, random_start=random_start),
        "l2": PGD(L2Ball(0.8), 10, 0.2, random_start=random_start),
        "l1": PGD(L1Ball(3.0), 10, 1.0, random_start=random_start),
    }


# --------------------------------------------------------------------------- trade-off


@pytest.mark.parametrize(
    ("row", "expected"),
    [  # Table 1: clean, linf, l2, l1, max, avg -> trade-off (percent)
        ((82.28, 40.33, 60.28, 68.13, 40.78, 56.32), 58.02),  # CIFAR-10, PSAT
        ((82.54, 39.74, 62.46, 56.10, 39.26, 52.77), 55.48),  # CIFAR-10, AT_max
        ((92.82, 0.00, 0.32, 0.11, 0.00, 0.14), 15.57),  # CIFAR-10, NAT
        ((91.20, 40.12, 57.66, 63.73, 29.30, 53.85), 55.98),  # SVHN, PSAT
        ((53.08, 27.62, 39.84, 44.15, 27.64, 37.19), 38.25),  # TinyImageNet, PSAT
    ],
)
def test_trade_off_reproduces_table1(row, expected):
    assert trade_off(dict(zip(TABLE1_KEYS, row, strict=True))) == pytest.approx(expected, abs=0.01)


def test_trade_off_needs_every_column_and_accepts_other_attack_names():
    with pytest.raises(ValueError, match=r"missing \['max'\]"):
        trade_off({"clean": 1.0, "linf": 0.5, "l2": 0.5, "l1": 0.5, "avg": 0.5})
    row = {"clean": 0.9, "a": 0.3, "max": 0.3, "avg": 0.3}
    assert trade_off(row, norms=("a",)) == pytest.approx(0.45)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_robustness_numbers_are_consistent(trained):
    model, x, y = trained
    torch.manual_seed(0)
    result = evaluate_robustness(model, x, y, attacks(), batch_size=128)
    assert set(result) == {"clean", "linf", "l2", "l1", "max", "avg", "trade_off"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
    per_norm = [result[n] for n in ("linf", "l2", "l1")]
    assert result["clean"] > 0.9
    assert all(acc < result["clean"] - 0.1 for acc in per_norm)  # the attacks bite
    assert result["max"] <= min(per_norm)
    assert result["avg"] == pytest.approx(sum(per_norm) / 3)
    assert result["trade_off"] == pytest.approx(trade_off(result))
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert result["clean"] == pytest.approx(clean)


def test_per_sample_results_agree_with_the_summary_and_the_probe(trained):
    model, x, y = trained
    torch.manual_seed(0)

    def predicted(inputs):
        return model(inputs).argmax(1)

    per = evaluate_per_sample(model, x, y, attacks(), batch_size=64, probe=predicted)
    assert per.attack_names == ("linf", "l2", "l1")
    assert set(per.correct) == set(per.probes) == {"clean", "linf", "l2", "l1"}
    for key, ok in per.correct.items():
        assert ok.dtype == torch.bool and ok.shape == y.shape
        # the probe saw exactly the inputs that were scored
        assert torch.equal(ok, per.correct["clean"] & (per.probes[key] == y))
    for name in per.attack_names:
        assert not (per.correct[name] & ~per.correct["clean"]).any()
    summary = summarize(per)
    every = per.correct["linf"] & per.correct["l2"] & per.correct["l1"]
    assert summary["max"] == pytest.approx(every.float().mean().item())
    assert summary["l2"] == pytest.approx(per.correct["l2"].float().mean().item())


def test_evaluation_does_not_depend_on_the_batch_size(trained):
    model, x, y = trained
    small = evaluate_robustness(model, x, y, attacks(random_start=False), batch_size=7)
    large = evaluate_robustness(model, x, y, attacks(random_start=False), batch_size=1000)
    assert small.keys() == large.keys()
    for key in small:
        assert small[key] == pytest.approx(large[key], abs=2 / len(y))


def test_evaluation_restores_modes_and_leaves_parameters_alone(trained):
    model, x, y = trained
    model.train()
    model[2].eval()  # a frozen BatchNorm stays frozen
    stats = model[2].running_mean.clone()
    try:
        result = evaluate_robustness(model, x[:50], y[:50], attacks(), batch_size=16)
        assert model.training and not model[2].training
        assert torch.equal(model[2].running_mean, stats)
        assert all(p.grad is None for p in model.parameters())
        assert 0 <= result["max"] <= result["clean"]
    finally:
        model.eval()


def test_default_eval_attacks_run_through_the_protocol(trained):
    model, x, y = trained
    configs = attack_defaults("digits", "eval", {n: {"restarts": 1} for n in ("linf", "l2", "l1")})
    result = evaluate_robustness(model, x[:40], y[:40], make_attacks(configs))
    assert result["max"] <= min(result["linf"], result["l2"], result["l1"]) <= result["clean"]


# --------------------------------------------------------------------------- sanity checks


class UnboundedLinf(LinfBall):
    """A buggy threat model: clips to the image box but forgets the ε-ball."""

    def project(self, delta, x):
        return (x + delta).clamp(0, 1) - x


def test_an_attack_leaving_its_ball_is_caught(trained):
    model, x, y = trained
    leaky = {"linf": PGD(UnboundedLinf(0.05), 10, 0.05)}
    with pytest.raises(SanityCheckError, match=r"attack 'linf': max \|\|x_adv - x\|\|_inf"):
        evaluate_robustness(model, x, y, leaky)


def test_an_attack_leaving_the_image_box_is_caught(trained):
    model, x, y = trained

    class Unclipped(PGD):  # a buggy attack: inside its ε-ball, but pixels at 1 leave the box
        def __call__(self, model, x, y):
            return x + 0.01

    assert (x == 1).any()
    with pytest.raises(SanityCheckError, match=r"attack 'linf': x_adv outside \[0, 1\]"):
        evaluate_robustness(model, x, y, {"linf": Unclipped(LinfBall(0.1), 1, 0.1)})


def test_nan_outputs_are_caught():
    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, NUM_CLASSES)

        def forward(self, inputs):
            return self.linear(inputs.flatten(1)) * float("nan")

    x, y = synthetic(8, seed=3)
    with pytest.raises(SanityCheckError, match="NaN"):
        evaluate_robustness(NaNModel(), x, y, attacks())


def test_probability_outputs_and_random_forwards_are_flagged(trained, caplog):
    model, x, y = trained
    softmaxed = nn.Sequential(model, nn.Softmax(dim=1))

    class Noisy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            return self.inner(inputs) + torch.randn(len(inputs), NUM_CLASSES)

    with caplog.at_level(logging.WARNING, logger="psat_core.metrics"):
        evaluate_robustness(softmaxed, x[:20], y[:20], {"linf": attacks()["linf"]})
        evaluate_robustness(Noisy(model), x[:20], y[:20], {"linf": attacks()["linf"]})
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "expect logits" in messages
    assert "not deterministic" in messages


def test_bad_evaluation_arguments():
    x, y = synthetic(4, seed=3)
    model = nn.Linear(64, NUM_CLASSES)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_robustness(nn.Sequential(nn.Flatten(), model), x, y, attacks(), batch_size=0)
    with pytest.raises(ValueError, match="attacks"):
        evaluate_robustness(nn.Sequential(nn.Flatten(), model), x, y, {})
    with pytest.raises(ValueError, match="labels"):
        evaluate_robustness(nn.Sequential(nn.Flatten(), model), x, y[:3], attacks())


# --------------------------------------------------------------------------- subsets


class Recording:
    """An attack that remembers how many points it was given."""

    def __init__(self, attack: PGD) -> None:
        self.attack, self.threat, self.sizes = attack, attack.threat, []

    def __call__(self, model, x, y):
        self.sizes.append(len(x))
        return self.attack(model, x, y)


def test_each_attack_runs_only_on_the_points_still_robust_for_its_norm(trained):
    model, x, y = trained
    chain = {
        "linf/pgd": Recording(PGD(LinfBall(0.05), 5, 0.0125)),
        "l2/pgd": Recording(PGD(L2Ball(0.8), 10, 0.2)),
        "linf/stronger": Recording(PGD(LinfBall(0.05), 20, 0.0125, restarts=2)),
    }
    seen = []
    per = evaluate_per_sample(
        model, x, y, chain, batch_size=1000, progress=lambda *event: seen.append(event)
    )
    clean = per.correct["clean"]
    assert chain["linf/pgd"].sizes == chain["l2/pgd"].sizes == [int(clean.sum())]
    assert chain["linf/stronger"].sizes == [int(per.correct["linf/pgd"].sum())]
    found = per.found("linf/pgd") | per.found("linf/stronger")
    assert not (per.found("linf/pgd") & per.found("linf/stronger")).any()
    assert torch.equal(found, clean & ~per.correct["linf/stronger"])
    assert [(name, robust, total) for name, robust, total, _ in seen] == [
        (name, int(per.correct[name].sum()), len(y)) for name in chain
    ]
    assert seen[-1][3] == 0.0 and all(left >= 0 for *_, left in seen)
    row = summarize(per)
    assert row["linf"] == row["linf/stronger"] <= row["linf/pgd"]


def test_the_same_seed_gives_the_same_numbers(trained):
    model, x, y = trained
    first = evaluate_per_sample(model, x, y, attacks(), seed=3)
    torch.manual_seed(123)  # the global state before the call does not matter
    state = torch.get_rng_state()
    second = evaluate_per_sample(model, x, y, attacks(), seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # and the call leaves it alone
    for key, ok in first.correct.items():
        assert torch.equal(ok, second.correct[key])


def test_the_papers_protocol_reads_off_a_strong_run(trained):
    model, x, y = trained
    configs = attack_defaults("digits", "eval", {n: {"steps": 5} for n in ("linf", "l2", "l1")})
    suites = {s: attack_suite(s, configs, ensemble=False, apgd_steps=3) for s in SUITES}
    paper, strong = (evaluate_per_sample(model, x, y, suites[s], seed=4) for s in SUITES)
    assert summarize(paper_view(strong)) == summarize(paper)
    assert summarize(strong)["max"] <= summarize(paper)["max"]


def test_resampling_seeds_turns_a_verdict_of_image_noise_into_inconclusive():
    """Three training seeds whose gaps disagree (+5, +6, -4 points) over 2,000 images: the
    images alone (the seeds pooled) say the gap is positive; resampling the seeds too, the
    interval covers zero."""
    from psat_core.metrics import paired_bootstrap

    generator = torch.Generator().manual_seed(0)
    images = 2000
    theirs = (torch.rand(3, images, generator=generator) < 0.5).float()
    ours = theirs.clone()
    for seed, gap in enumerate((0.05, 0.06, -0.04)):  # flip that share of images
        flip = torch.randperm(images, generator=generator)[: round(abs(gap) * images)]
        ours[seed, flip] = 1.0 if gap > 0 else 0.0
        theirs[seed, flip] = 0.0 if gap > 0 else 1.0
    pooled = paired_bootstrap(ours.flatten(), theirs.flatten(), resamples=2000)
    two_stage = paired_bootstrap(ours, theirs, resamples=2000)
    assert pooled[0] == pytest.approx(two_stage[0])  # the same gap, about 2.3 points
    assert pooled[1] > 0  # "holds", from image noise alone
    assert two_stage[1] < 0 < two_stage[2]  # inconclusive once seeds are resampled


def test_one_seed_is_the_image_bootstrap_and_batches_do_not_change_it():
    from psat_core.metrics import paired_bootstrap

    generator = torch.Generator().manual_seed(1)
    ours, theirs = (torch.rand(2, 300, generator=generator) < 0.6).float()
    whole = paired_bootstrap(ours, theirs, resamples=500)
    assert paired_bootstrap(ours[None], theirs[None], resamples=500) == whole
    assert paired_bootstrap(ours, theirs, resamples=500, batch_elements=300 * 7) == whole


def test_the_bootstrap_of_svhns_test_split_stays_within_its_memory_bound():
    """26,032 images (SVHN's test split) x 3 seeds, 1,000 resamplings: what the process holds
    grows by less than 200 MB (resampling all at once would hold 624 MB of indices)."""
    script = textwrap.dedent(
        """
        import resource, torch
        from psat_core.metrics import paired_bootstrap
        ours, theirs = (torch.rand(2, 3, 26_032) < 0.5).float()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        paired_bootstrap(ours, theirs, resamples=1000)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    grown_kb = int(subprocess.run([sys.executable, "-c", script], check=True,
                                  capture_output=True, text=True).stdout)  # fmt: skip
    assert grown_kb < 200_000, grown_kb
