"""Every registered training method, tested for free (timm's tests, parametrised over its
registry): a new baseline method is one `register_method` in psat_core.steps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import SAT_RADII, sat_norm

from orchestrator.training.plan import MULTI_NORM
from psat_core.attacks import PGD
from psat_core.models import create_model
from psat_core.settings import NORMS, attack_defaults
from psat_core.steps import METHODS, crafted_on, train_step, training_inputs


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_a_step_and_moves_the_weights(name):
    torch.manual_seed(0)
    model = create_model("resnet10", num_classes=10, in_channels=1)
    norms = NORMS if METHODS[name].multi_norm else ("linf",)
    configs = attack_defaults("digits", "train")
    method = training_inputs(name, {n: configs[n] for n in norms if name != "nat"}, in_channels=1)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_step(model, x, y, optimizer, method)
    assert torch.isfinite(torch.tensor(stats["loss"])) and 0 <= stats["accuracy"] <= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def _bn_forwards(model: torch.nn.Module) -> int:
    """Train-mode forwards BatchNorm counted, over all its layers."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return sum(int(m.num_batches_tracked) for m in norms)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_methods_attack_crafts_with_batch_statistics_without_updating_them(name):
    """`training.attack_bn: batch`: for every method the training attack sees BatchNorm's batch
    statistics, yet the step updates BatchNorm's running statistics as often as with the
    paper's eval-mode crafting (only the training forwards count), and it trains on other
    examples (a fresh model's running statistics are not its batches')."""
    norms = NORMS if METHODS[name].multi_norm else ("linf",)
    configs = attack_defaults("digits", "train")
    x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
    counts, weights = {}, {}
    for attack_bn in ("running", "batch"):
        torch.manual_seed(0)
        model = create_model("resnet10", num_classes=10, in_channels=1)
        attacks = {n: configs[n] for n in norms if name != "nat"}
        method = training_inputs(name, attacks, in_channels=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, x, y, optimizer, method, attack_bn=attack_bn)
        counts[attack_bn] = _bn_forwards(model)
        weights[attack_bn] = [p.detach().clone() for p in model.parameters()]
    assert counts["batch"] == counts["running"] > 0
    same = all(torch.equal(a, b) for a, b in zip(*weights.values(), strict=True))
    assert same == (name == "nat")  # NAT crafts nothing


def test_crafting_on_batch_statistics_restores_every_mode_momentum_and_count():
    torch.manual_seed(0)
    model = create_model("resnet10", num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,))
    model.eval()
    next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).train()  # mixed
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
    pgd = PGD.from_config(attack_defaults("digits", "train")["linf"])
    with crafted_on(model, "running") as target:
        assert target is model
    with crafted_on(model, "batch") as target:
        torch.manual_seed(1)
        batch_example = pgd.last_iterate(target, x, y)
        assert all(m.training for m in model.modules())  # the attack's eval() changed nothing
        with torch.no_grad():
            torch.testing.assert_close(target(x), model.train()(x))  # batch statistics
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # untouched
    assert {m.momentum for m in model.modules() if hasattr(m, "momentum")} == {0.1}
    torch.manual_seed(1)
    assert not torch.equal(batch_example, pgd.last_iterate(model, x, y))  # eval-mode crafting
    refused = pytest.raises(ValueError, match="unknown attack_bn 'frozen'; allowed: running, batch")
    with refused, crafted_on(model, "frozen"):
        pass


def test_table1_trains_the_multi_norm_methods_registered():
    assert MULTI_NORM == ("max", "avg", "msd", "mng")


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="allowed: nat, at, max, avg, msd, sat, mng"):
        training_inputs("fgsm", {})


def test_sat_trains_each_batch_against_one_norm_drawn_at_random():
    """SAT (Table 5): one PGD per batch, its norm drawn uniformly; radii far apart tell which
    norm's ball each example lies in (helpers.sat_norm)."""
    configs = attack_defaults("digits", "train")
    attacks = {n: replace(configs[n], eps=SAT_RADII[n]) for n in NORMS}
    method = training_inputs("sat", attacks)
    model = create_model("resnet10", num_classes=10, in_channels=1).eval()
    x, y = torch.rand(8, 1, 8, 8) * 0.5 + 0.25, torch.randint(10, (8,))
    torch.manual_seed(0)
    drawn = [sat_norm(x, *method(model, x, y)) for _ in range(24)]
    assert set(drawn) == set(NORMS), drawn
