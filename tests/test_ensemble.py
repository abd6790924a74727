"""psat_core.ensemble: lowest-entropy (eq. 12) and average (Table 4) inference over members."""

import math

import pytest
import torch
from torch import nn

from psat_core.ensemble import (
    STRATEGIES,
    PSATEnsemble,
    average,
    entropy,
    lowest_entropy,
)


class FixedLogits(nn.Module):
    """A member answering the same known logits ``N x C`` whatever the input's values."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits + 0.0 * x.sum()


# Per sample, the member with the sharpest softmax: sample 0 -> member 1, 1 -> member 2,
# 2 -> member 0.
CERTAIN, UNSURE, FLAT = [9.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]
MEMBER_LOGITS = [
    [UNSURE, FLAT, CERTAIN],
    [CERTAIN, UNSURE, FLAT],
    [FLAT, CERTAIN, UNSURE],
]


def test_entropy_matches_definition_and_bounds():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1000.0, 0.0, -1000.0]])
    p = logits[:2].softmax(-1)
    assert torch.allclose(entropy(logits[:2]), -(p * p.log()).sum(-1))
    h = entropy(logits)
    assert torch.isclose(h[1], torch.tensor(math.log(3)))
    assert h[2] == 0.0  # stable for large logits: no NaN from 0 * log 0
    assert entropy(torch.zeros(4, 5, 7)).shape == (4, 5)


def test_lowest_entropy_picks_the_most_certain_member_per_sample():
    member_logits = torch.tensor(MEMBER_LOGITS)
    logits, index = lowest_entropy(member_logits)
    assert index.tolist() == [1, 2, 0]
    assert index.dtype == torch.int64
    assert torch.equal(logits, torch.tensor([CERTAIN] * 3))


def test_lowest_entropy_ties_go_to_the_lowest_member_index():
    same = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # Members 1 and 2 are equally certain (permuted logits, same entropy) and beat member 0.
    member_logits = torch.stack([torch.zeros(2, 2), same, same.flip(-1)])
    logits, index = lowest_entropy(member_logits)
    assert index.tolist() == [1, 1]
    assert torch.equal(logits, same)
    _, index = lowest_entropy(torch.zeros(4, 3, 5))
    assert index.tolist() == [0, 0, 0]


def test_average_is_the_log_of_mean_probabilities():
    member_logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)) * 3
    log_mean, index = average(member_logits)
    mean = member_logits.softmax(-1).mean(0)
    assert torch.allclose(log_mean, mean.log(), atol=1e-6)
    assert torch.allclose(log_mean.exp().sum(-1), torch.ones(5))
    # index: the member giving the ensemble's predicted class the highest probability
    predicted = mean.argmax(-1)
    expected = member_logits.softmax(-1)[:, torch.arange(5), predicted].argmax(0)
    assert torch.equal(index, expected)


def test_average_member_index_on_known_outputs():
    _, index = average(torch.tensor(MEMBER_LOGITS))
    # Every sample: the CERTAIN member's class 0 wins, and that member contributes most.
    assert index.tolist() == [1, 2, 0]


def test_ensemble_returns_the_chosen_members_logits():
    members = [FixedLogits(logits) for logits in MEMBER_LOGITS]
    ensemble = PSATEnsemble(members, names=["linf", "l2", "l1"])
    x = torch.rand(3, 1, 2, 2)
    logits, index = ensemble.forward_with_choice(x)
    assert index.tolist() == [1, 2, 0]
    assert [ensemble.names[i] for i in index] == ["l2", "l1", "linf"]
    assert torch.equal(logits, torch.tensor([CERTAIN] * 3))
    assert torch.equal(ensemble(x), logits)
    assert ensemble.member_logits(x).shape == (3, 3, 3)


def test_strategy_can_be_switched_to_average():
    members = [FixedLogits(logits) for logits in MEMBER_LOGITS]
    ensemble = PSATEnsemble(members, strategy="average")
    x = torch.rand(3, 4)
    assert torch.allclose(ensemble(x), average(torch.tensor(MEMBER_LOGITS))[0])
    ensemble.strategy = "lowest_entropy"
    assert torch.equal(ensemble(x), torch.tensor([CERTAIN] * 3))
    assert ensemble.names == ("member0", "member1", "member2")
    assert "lowest_entropy" in repr(ensemble)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_gradients_reach_the_input_through_the_chosen_member(strategy):
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(12, 4)) for _ in range(3)]
    with torch.no_grad():
        for member in members:
            member[1].weight.mul_(10)  # confident members, whose choice varies by sample
    ensemble = PSATEnsemble(members, strategy=strategy)
    x = (torch.rand(8, 3, 2, 2) - 0.5).requires_grad_()
    y = torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(ensemble(x), y, reduction="sum").backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if strategy == "lowest_entropy":
        _, index = ensemble.forward_with_choice(x)
        assert set(index.tolist()) == {0, 1, 2}
        # Per sample, the gradient is exactly that of the chosen member alone.
        for i, m in enumerate(index.tolist()):
            xi = x[i : i + 1].detach().requires_grad_()
            nn.functional.cross_entropy(members[m](xi), y[i : i + 1]).backward()
            assert torch.allclose(x.grad[i], xi.grad[0], atol=1e-6)


def test_train_and_eval_reach_every_member():
    members = [nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3)) for _ in range(2)]
    ensemble = PSATEnsemble(members).eval()
    assert all(not m.training for m in ensemble.modules())
    ensemble.train()
    assert all(m.training for m in ensemble.modules())
    assert list(ensemble.parameters()) == [p for m in members for p in m.parameters()]


def test_invalid_configurations_are_value_errors():
    member = FixedLogits([CERTAIN])
    with pytest.raises(ValueError, match="'vote'.*average.*lowest_entropy"):
        PSATEnsemble([member], strategy="vote")
    ensemble = PSATEnsemble([member])
    with pytest.raises(ValueError, match="'max'"):
        ensemble.strategy = "max"
    assert ensemble.strategy == "lowest_entropy"
    with pytest.raises(ValueError, match="at least one member"):
        PSATEnsemble([])
    with pytest.raises(ValueError, match="2 names.*1 members"):
        PSATEnsemble([member], names=["linf", "l2"])
    mismatched = PSATEnsemble([member, FixedLogits([CERTAIN + [0.0]])])
    with pytest.raises(ValueError, match="different shapes"):
        mismatched(torch.zeros(1, 2))
