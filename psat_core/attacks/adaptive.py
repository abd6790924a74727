"""Attacks that know the defence: the lowest-entropy gate (eq. 12) attacked end to end.

The paper evaluates PSAT with per-norm PGD on the ensemble. Through the gate's argmin a
gradient reaches the input only via the member chosen at the current point, and says nothing
about making the gate switch. Two attacks aim at the gate itself:

* :class:`GatePGD`: PGD whose gradient comes from a smooth gate, the members' softmax mixed with
  weights ``softmax(-H_m / τ)`` over members (τ -> 0 is eq. 12), while every iterate is scored
  by the true ensemble (straight-through, as in BPDA), merged with plain PGD per example.
* :class:`ConfidentWrongMember`: for each member, PGD that makes that member confident in a
  wrong class (low entropy, so the gate picks it); per example the iterate the true ensemble
  gets most wrong is kept.
* :class:`MemberTransfer`: each member's own adversarial examples, scored by the ensemble;
  the examples can come from the member rows' own evaluation (:func:`member_examples`).

Both take a :class:`~psat_core.ensemble.PSATEnsemble` as the model and return ``x_adv`` in their
threat model's ball, so the evaluator checks them like any attack; named ``"<norm>/<variant>"``
they count under their norm and in ``max`` (see :mod:`psat_core.metrics`). The ``strong`` suite
(:mod:`psat_core.attacks.suites`) runs them on ensembles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psat_core.attacks.pgd import PGD, WorstIterate, eval_mode, loss_and_wrong
from psat_core.attacks.threat import ThreatModel, threat_model
from psat_core.ensemble import STRATEGIES, PSATEnsemble, entropy
from psat_core.metrics import PerSampleResult, attack_seed
from psat_core.settings import AttackConfig


class SoftGate(nn.Module):
    """The ensemble's output, with the gradient of a smooth lowest-entropy gate.

    Forward value: ``ensemble(x)``. Gradient: that of ``log sum_m w_m softmax(f_m(x))`` with
    ``w = softmax(-H(f(x)) / temperature)`` over the members, so an attack also sees how moving
    ``x`` changes which member answers.
    """

    def __init__(self, ensemble: PSATEnsemble, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SoftGate.temperature must be > 0 (got {temperature!r})")
        self.ensemble = ensemble
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        member_logits = self.ensemble.member_logits(x)  # M x N x C
        log_w = F.log_softmax(-entropy(member_logits) / self.temperature, dim=0)  # M x N
        log_p = F.log_softmax(member_logits, dim=-1)
        soft = torch.logsumexp(log_w[..., None] + log_p, dim=0)  # N x C
        value = STRATEGIES[self.ensemble.strategy](member_logits.detach())[0]
        return value + (soft - soft.detach())


class GatePGD:
    """End-to-end PGD on the ensemble through a smooth lowest-entropy gate (:class:`SoftGate`).

    It runs plain PGD through the ensemble and PGD with the soft gate's gradient, and keeps the
    worst point of both per example: at least as strong as plain PGD with the same seed.
    Iterates, restarts and the worst-iterate bookkeeping are :class:`~psat_core.attacks.pgd.PGD`'s.
    """

    def __init__(self, pgd: PGD, temperature: float = 0.1) -> None:
        self.pgd = pgd
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: AttackConfig, temperature: float = 0.1) -> GatePGD:
        return cls(PGD.from_config(cfg), temperature)

    @property
    def threat(self) -> ThreatModel:
        return self.pgd.threat

    @property
    def cost(self) -> int:
        return 2 * self.pgd.cost

    def __call__(self, model: PSATEnsemble, x: Tensor, y: Tensor) -> Tensor:
        worst = WorstIterate(x)
        for attacked in (model, SoftGate(model, self.temperature)):  # same value, other gradient
            found = self.pgd.perturb(attacked, x, y)
            worst.update(found.x_adv - x, found.loss, found.misclassified)
        return worst.result(x).x_adv

    def __repr__(self) -> str:
        return f"GatePGD({self.pgd!r}, temperature={self.temperature:g})"


def confident_wrong(logits: Tensor, y: Tensor) -> Tensor:
    """``log P(wrong) - H(f)``: mass off the true class up, the entropy (eq. 12's gate) down."""
    log_p = F.log_softmax(logits, dim=1)
    log_wrong = log_p.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
    return log_wrong - entropy(logits)


class ConfidentWrongMember:
    """Make one member confidently wrong so that the gate picks it; keep what fools the gate.

    For each member ``m``, PGD from 0 ascends :func:`confident_wrong` on ``f_m``. Each member's
    last iterate is scored by the whole ensemble; per example the one it misclassifies (then
    the one with the highest ensemble loss) is returned. Cost: one PGD run on the ensemble.
    """

    def __init__(self, threat: ThreatModel, steps: int, step_size: float) -> None:
        self.pgd = PGD(threat, steps, step_size, random_start=False, loss=confident_wrong)

    @classmethod
    def from_config(cls, cfg: AttackConfig) -> ConfidentWrongMember:
        return cls(threat_model(cfg.norm, cfg.eps), cfg.steps, cfg.step_size)

    @property
    def threat(self) -> ThreatModel:
        return self.pgd.threat

    @property
    def cost(self) -> int:
        return self.pgd.steps

    def __call__(self, model: PSATEnsemble, x: Tensor, y: Tensor) -> Tensor:
        x, y = x.detach(), y.detach()
        worst = WorstIterate(x)
        with eval_mode(model):
            for member in model.members:
                x_adv = self.pgd.last_iterate(member, x, y)
                with torch.no_grad():
                    worst.update(x_adv - x, *loss_and_wrong(model, x_adv, y))
        return worst.result(x).x_adv

    def __repr__(self) -> str:
        pgd = self.pgd
        return f"ConfidentWrongMember({pgd.threat!r}, steps={pgd.steps}, step={pgd.step_size:g})"


class MemberTransfer:
    """Each member's own adversarial examples, scored by the ensemble (a transfer attack).

    The gate answers with one member; an example crafted against that member alone often
    fools it through the ensemble too, where gradients through the gate's argmin are
    uninformative. Every ``attack`` runs on every member; per example the candidate the
    ensemble misclassifies (then the one with its highest loss) is kept.

    ``examples``: ``(K, N, *)`` those candidates for every evaluated image, crafted already
    (each member by each attack, e.g. the member rows' own, :func:`member_examples`); the
    attack then scores the rows ``index`` of the points it is given instead of crafting them.
    """

    def __init__(self, attacks: list, examples: Tensor | None = None) -> None:
        if not attacks:
            raise ValueError("MemberTransfer.attacks must name at least one attack")
        self.attacks = attacks
        self.threat = attacks[0].threat
        self.examples = examples

    @property
    def indexed(self) -> bool:
        """Whether a call needs ``index`` (the candidates were crafted already)."""
        return self.examples is not None

    @property
    def cost(self) -> int:
        """Per member, every crafter's passes (a member's pass is a fraction of the ensemble's);
        with the candidates given, one forward pass of the ensemble each (about a third of a
        gradient pass)."""
        if self.examples is not None:
            return max(1, len(self.examples) // 3)
        return sum(getattr(attack, "cost", 1) for attack in self.attacks)

    def __call__(
        self, model: PSATEnsemble, x: Tensor, y: Tensor, index: Tensor | None = None
    ) -> Tensor:
        x, y = x.detach(), y.detach()
        worst = WorstIterate(x)
        with eval_mode(model):
            for x_adv in self._candidates(model, x, y, index):
                with torch.no_grad():
                    worst.update(x_adv - x, *loss_and_wrong(model, x_adv, y))
        return worst.result(x).x_adv

    def _candidates(self, model: PSATEnsemble, x: Tensor, y: Tensor, index: Tensor | None):
        if self.examples is not None:
            if index is None:
                raise ValueError("MemberTransfer with its examples given needs the index of x")
            yield from self.examples[:, index.cpu()].to(x.device)
            return
        for member in model.members:
            for attack in self.attacks:
                yield attack(member, x, y)

    def __repr__(self) -> str:
        crafted = "" if self.examples is None else f", examples={tuple(self.examples.shape)}"
        return f"MemberTransfer({', '.join(map(repr, self.attacks))}{crafted})"


def member_examples(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    result: PerSampleResult,
    attacks: dict,
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """``(len(attacks), N, *)``: what each of ``attacks`` found against ``model`` (one member)
    on every image, for :class:`MemberTransfer`. Where the member's own evaluation ran the
    attack (``result``, an evaluation that kept its examples) they are reused; elsewhere
    (points broken earlier, or misclassified clean) the attack runs now, seeded by ``seed``."""
    device = images.device
    found = []
    with eval_mode(model):
        for name, attack in attacks.items():
            crafted = result.examples[name].to(device, copy=True)
            todo = (~result.attacked(name)).nonzero().squeeze(1).to(device)
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                torch.manual_seed(attack_seed(seed, f"{name}/member-examples", start))
                crafted[batch] = attack(model, images[batch], labels[batch])
            found.append(crafted.cpu())
    return torch.stack(found)


def adaptive_attacks(configs: dict[str, AttackConfig], temperature: float = 0.1) -> dict:
    """``{"<norm>/gate": GatePGD, "<norm>/confident": ConfidentWrongMember}`` per eval config."""
    attacks: dict[str, GatePGD | ConfidentWrongMember] = {}
    for norm, cfg in configs.items():
        attacks[f"{norm}/gate"] = GatePGD.from_config(cfg, temperature)
        attacks[f"{norm}/confident"] = ConfidentWrongMember.from_config(cfg)
    return attacks
