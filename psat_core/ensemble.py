"""The aggregated PSAT model F_H (paper eq. 10) and its inference strategies.

Each member (one per perturbation norm, e.g. the hypernetwork classifiers H_inf, H_2, H_1)
sees the same input; a strategy turns the stacked member logits ``M x N x C`` into one output
per sample:

- ``"lowest_entropy"`` (eq. 12, the paper's choice): the member whose softmax is most certain.
- ``"average"`` (Table 4): the mean of the members' softmax probabilities.

Example::

    ensemble = PSATEnsemble([h_inf, h_2, h_1], names=["linf", "l2", "l1"]).eval()
    logits, member = ensemble.forward_with_choice(x)  # member[i] indexes ensemble.names
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` over the last dim: H = -sum_k p_k log p_k (eq. 12).

    Computed from ``log_softmax`` so large logits neither overflow nor give ``0 * log 0``;
    logits must be finite.

    Args:
        logits: ``... x C``.

    Returns:
        ``...`` (the last dim reduced), in nats, between 0 and log C.
    """
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def lowest_entropy(member_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the output of the member with the lowest softmax entropy (eq. 12).

    Ties go to the lowest member index. Gradients flow through the chosen member's logits only;
    the choice itself is discrete.

    Args:
        member_logits: ``M x N x C`` (members x samples x classes).

    Returns:
        ``(logits, member_index)``: the chosen members' logits ``N x C``, unchanged, and their
        indices ``N`` (int64).
    """
    with torch.no_grad():
        member_index = entropy(member_logits).argmin(dim=0)  # argmin returns the first minimum
    samples = torch.arange(member_logits.shape[1], device=member_logits.device)
    return member_logits[member_index, samples], member_index


def average(member_logits: Tensor) -> tuple[Tensor, Tensor]:
    """The average strategy (Table 4): the mean of the members' softmax probabilities.

    Args:
        member_logits: ``M x N x C``.

    Returns:
        ``(log_probs, member_index)``: ``log(mean_m softmax(member_logits[m]))`` of shape
        ``N x C``, which cross-entropy and argmax take like logits; and, per sample, the member
        giving the highest probability to the ensemble's predicted class (ties: lowest index),
        i.e. the member that contributes most to the prediction.
    """
    log_p = F.log_softmax(member_logits, dim=-1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(member_logits.shape[0])
    with torch.no_grad():
        predicted = log_mean.argmax(dim=-1)  # N
        member_index = log_p.gather(-1, predicted.expand(log_p.shape[0], -1)[..., None])
        member_index = member_index.squeeze(-1).argmax(dim=0)
    return log_mean, member_index


STRATEGIES: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "lowest_entropy": lowest_entropy,
    "average": average,
}


class PSATEnsemble(nn.Module):
    """The aggregated model F_H = union of the members (eq. 10), answering by ``strategy``.

    A plain ``nn.Module`` mapping images to logits, so every attack applies to it end to end:
    gradients reach the input through the member each sample's answer comes from.
    ``train()``/``eval()`` reach the members, which are registered in an ``nn.ModuleList``.

    Args:
        members: one or more modules mapping ``x`` to logits ``N x C`` (same C for all).
        strategy: a key of :data:`STRATEGIES`, default ``"lowest_entropy"`` (eq. 12); may be
            reassigned later, e.g. to compare strategies as in Table 4.
        names: one label per member (e.g. the norm it was trained against); default
            ``"member0"``, ``"member1"``, ...

    Raises:
        ValueError: no members, ``len(names) != len(members)``, or an unknown strategy.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        strategy: str = "lowest_entropy",
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("PSATEnsemble needs at least one member, got none")
        names = tuple(f"member{i}" for i in range(len(members))) if names is None else tuple(names)
        if len(names) != len(members):
            raise ValueError(f"got {len(names)} names {list(names)} for {len(members)} members")
        self.members = nn.ModuleList(members)
        self.names = names
        self.strategy = strategy

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; allowed: {sorted(STRATEGIES)}")
        self._strategy = strategy

    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits, stacked: ``M x N x C``."""
        outputs = [member(x) for member in self.members]
        shapes = {tuple(out.shape) for out in outputs}
        if len(shapes) != 1:
            raise ValueError(f"members returned logits of different shapes: {sorted(shapes)}")
        return torch.stack(outputs)

    def forward_with_choice(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits N x C, member_index N)``; see :func:`lowest_entropy` and :func:`average` for
        what the index means under each strategy. ``self.names[i]`` names member ``i``."""
        return STRATEGIES[self.strategy](self.member_logits(x))

    def forward(self, x: Tensor) -> Tensor:
        """The ensemble's logits ``N x C`` for input ``x``."""
        return self.forward_with_choice(x)[0]

    @torch.inference_mode()
    def predict(
        self, images: Tensor, strategy: str | None = None, batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """Per image: the answer's ``class`` (int64), its ``probability`` (float64) and the
        ``member`` (name) that answered, under ``strategy`` (default the ensemble's own).

        The strategy is applied per call, not set on the ensemble: calls may run concurrently.
        """
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; allowed: {sorted(STRATEGIES)}")
        classes, probabilities, members = [], [], []
        for batch in images.split(batch_size):
            logits, member = STRATEGIES[strategy](self.member_logits(batch))
            probability, label = logits.softmax(dim=-1).max(dim=-1)
            classes.append(label.cpu())
            probabilities.append(probability.cpu())
            members.append(member.cpu())
        return {
            "class": torch.cat(classes).numpy().astype(np.int64),
            "probability": torch.cat(probabilities).double().numpy(),
            "member": np.asarray(self.names, dtype=object)[torch.cat(members).numpy()],
        }

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, names={list(self.names)}"
