"""Every registered training method, tested for free (timm's tests, parametrised over its
registry): a new baseline method is one `register_method` in psat_core.steps."""

from __future__ import annotations

import pytest
import torch

from orchestrator.training.plan import MULTI_NORM
from psat_core.models import create_model
from psat_core.settings import NORMS, attack_defaults
from psat_core.steps import METHODS, train_step, training_inputs


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


def test_table1_trains_the_multi_norm_methods_registered():
    assert MULTI_NORM == ("max", "avg", "msd", "mng")


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="allowed: nat, at, max, avg, msd, mng"):
        training_inputs("fgsm", {})
