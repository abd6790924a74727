"""Auto-PGD at AutoAttack strength, on psat's threat models, for ℓ∞, ℓ2 and ℓ1.

APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks") for ℓ∞ and ℓ2: step size η = 2ε, momentum 0.75, and at
checkpoints (22% of the budget, then shrinking by 3% to at least 6%) the step is halved and the
run restarted from its best point when the loss oscillates or stalls. ℓ1-APGD (Croce & Hein
2021, "Mind the box"): the step moves the top-k coordinates with adaptive k (from 20% of d,
then 1/1.5 of the best point's sparsity), η = ε adapted between ε/10 and ε, the exact
projection onto the ℓ1 ball ∩ box (:func:`~psat_core.attacks.threat.project_l1_ball`), and the
3ε → 2ε → ε schedule of AutoAttack's ℓ1 version.

Losses: cross-entropy (``"ce"``), the difference of logits ratio (``"dlr"``) and, with
``targets > 0``, APGD-T: the targeted DLR loss against each of the ``targets`` most likely wrong
classes in turn. As in AutoAttack, restarts and targets only attack examples not yet
misclassified, and the worst point per example is kept (misclassified first, then the higher
cross-entropy, :class:`~psat_core.attacks.pgd.WorstIterate`), so the result merges with psat's
other attacks. APGD-CE and APGD-T are the ``strong`` suite's AutoAttack part
(:mod:`psat_core.attacks.suites`).

Example::

    >>> apgd_t = APGD(threat_model("l2", 1.0), steps=100, loss="dlr", targets=9)
    >>> x_adv = apgd_t(model, x, y)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psat_core.attacks.pgd import AttackResult, ThreatAttack, WorstIterate, eval_mode
from psat_core.attacks.threat import ThreatModel, per_sample, project_l1_ball
from psat_core.settings import check_count, invalid

__all__ = ["APGD", "LOSSES", "dlr_loss"]

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75  # α of the momentum step
RHO = 0.75  # a checkpoint halves η when fewer than ρ of its steps raised the loss
L1_SCHEDULE = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))  # AutoAttack's ℓ1 radii x budget share


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of logits ratio, per example (Croce & Hein 2020, eqs. 4 and 6).

    Untargeted: ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)``; targeted at ``t``:
    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)``, π sorting the logits in decreasing order.
    """
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        others = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
        return -(z_y - others) / (top[:, 0] - top[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


class APGD(ThreatAttack):
    """Auto-PGD with the cross-entropy or DLR loss; APGD-T with ``targets > 0``.

    Args:
        threat: the threat model (norm, ε); ℓ1 runs ℓ1-APGD.
        steps: iterations per restart (per target for APGD-T), >= 1 (AutoAttack: 100).
        restarts: random restarts, >= 1 (AutoAttack: 5 for APGD-CE, 1 per target for APGD-T).
        loss: ``"ce"`` or ``"dlr"``; with ``targets`` the targeted DLR loss.
        targets: 0 for untargeted; else the number of most likely wrong classes to target
            (AutoAttack: 9 for ℓ∞ and ℓ2, 5 for ℓ1).
        seed: seeds each run's random start, for reproducible rows.

    Shapes: ``x`` ``(B, *)`` in [0, 1]; ``y`` ``(B,)``; returns ``(B, *)``.
    """

    def __init__(
        self,
        threat: ThreatModel,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        targets: int = 0,
        seed: int = 0,
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise invalid("APGD", "threat", threat, "a ThreatModel (see THREAT_MODELS)")
        check_count("APGD", "steps", steps)
        check_count("APGD", "restarts", restarts)
        if loss not in LOSSES:
            raise invalid("APGD", "loss", loss, f"one of {', '.join(LOSSES)}")
        if isinstance(targets, bool) or not isinstance(targets, int) or targets < 0:
            raise invalid("APGD", "targets", targets, "an integer >= 0")
        self.threat, self.steps, self.restarts = threat, steps, restarts
        self.loss = "dlr" if targets else loss
        self.targets, self.seed = targets, seed

    @property
    def cost(self) -> int:
        """Gradient passes per attacked example (at most: runs stop on misclassified ones)."""
        return self.steps * self.restarts * max(self.targets, 1)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        """Every restart (and target) on the examples still classified correctly."""
        x, y = x.detach(), y.detach()
        worst = WorstIterate(x)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with eval_mode(model), torch.enable_grad():
            with torch.no_grad():
                ranked = model(x).argsort(dim=1, descending=True)
            targets = min(self.targets, ranked.shape[1] - 1)
            for target_rank in range(1, targets + 1) if targets else [None]:
                for _ in range(self.restarts):
                    todo = (~worst.wrong).nonzero().squeeze(1)
                    if len(todo) == 0:
                        return worst.result(x)
                    target = None
                    if target_rank is not None:  # the rank-th most likely class other than y
                        order = ranked[todo]
                        skip = (order[:, :target_rank] == y[todo, None]).any(dim=1).long()
                        target = order.gather(1, (target_rank - 1 + skip)[:, None]).squeeze(1)
                    found = self._run(model, x[todo], y[todo], target, generator)
                    worst.merge(todo, found)
        return worst.result(x)

    def _run(self, model, x: Tensor, y: Tensor, target, generator) -> WorstIterate:
        if self.norm != "l1":
            return _apgd(model, x, y, self.threat, self.steps, self._loss(target), generator)
        start = None
        for scale, share in L1_SCHEDULE:  # each stage starts at the last one's best point
            steps = max(1, round(share * self.steps))
            threat = type(self.threat)(scale * self.eps)
            found, start = _apgd_l1(
                model, x, y, threat, steps, self._loss(target), generator, start
            )
        return found  # the last stage's, at radius ε

    def _loss(self, target: Tensor | None):
        if self.loss == "ce":
            return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
        return lambda logits, y: dlr_loss(logits, y, target)

    def __repr__(self) -> str:
        kind = f"APGD-T(targets={self.targets})" if self.targets else f"APGD-{self.loss.upper()}"
        return f"{kind}({self.threat!r}, steps={self.steps}, restarts={self.restarts})"


def _evaluate(model, x_adv: Tensor, y: Tensor, loss_fn) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attack loss, its gradient w.r.t. the input, cross-entropy and misclassification."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    logits = logits.detach()
    ce = F.cross_entropy(logits, y, reduction="none")
    return loss.detach(), grad, ce, logits.argmax(dim=1) != y


def _random_start(threat: ThreatModel, x: Tensor, generator: torch.Generator) -> Tensor:
    """AutoAttack's start: on the ball's boundary (ℓ∞, ℓ2), projected noise (ℓ1)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if threat.norm == "linf":
        noise = noise.sign() * torch.rand(x.shape, generator=generator, device=x.device)
        noise = noise / noise.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    elif threat.norm == "l2":
        noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    if threat.norm != "l1":
        noise = noise * threat.eps
    return threat.project(noise.view_as(x), x)


def _apgd(model, x, y, threat, steps, loss_fn, generator) -> WorstIterate:
    """One APGD run for ℓ∞ or ℓ2 (Algorithm 1 of Croce & Hein 2020)."""
    found = WorstIterate(x)
    checkpoint, shrink = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1)
    floor = max(int(0.06 * steps), 1)
    delta = _random_start(threat, x, generator)
    loss, grad, ce, wrong = _evaluate(model, x + delta, y, loss_fn)
    found.update(delta, ce, wrong)
    eta = torch.full((len(x),), 2.0 * threat.eps, device=x.device)
    best_loss, best_delta, best_grad = loss.clone(), delta.clone(), grad.clone()
    previous = delta.clone()
    increases = torch.zeros(len(x), device=x.device)
    reduced = torch.ones(len(x), dtype=torch.bool, device=x.device)
    best_at_check = best_loss.clone()
    since_check = 0
    for i in range(steps):
        with torch.no_grad():  # eq. (2): a projected step, then momentum towards it
            z = threat.project(threat.step(delta, grad, per_sample(eta, x), x), x)
            alpha = MOMENTUM if i > 0 else 1.0
            moved = delta + alpha * (z - delta) + (1 - alpha) * (delta - previous)
            previous, delta = delta, threat.project(moved, x)
        new_loss, grad, ce, wrong = _evaluate(model, x + delta, y, loss_fn)
        found.update(delta, ce, wrong)
        increases += new_loss > loss
        loss = new_loss
        better = loss > best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_delta[better], best_grad[better] = delta[better], grad[better]
        since_check += 1
        if since_check == checkpoint:  # conditions 1 and 2 of section 3.2
            oscillates = increases <= RHO * checkpoint
            stalled = ~reduced & (best_at_check >= best_loss)
            halve = oscillates | stalled
            eta = torch.where(halve, eta / 2, eta)
            delta[halve], grad[halve] = best_delta[halve], best_grad[halve]
            reduced, best_at_check = halve, best_loss.clone()
            increases.zero_()
            since_check, checkpoint = 0, max(checkpoint - shrink, floor)
    return found


def _apgd_l1(model, x, y, threat, steps, loss_fn, generator, start) -> tuple[WorstIterate, Tensor]:
    """One ℓ1-APGD run (Croce & Hein 2021, Algorithm 1): adaptive sparsity and step size.

    Starts at ``start`` when given (the previous stage's best point); returns the worst points
    and the highest-loss perturbation."""
    found = WorstIterate(x)
    d = x[0].numel()
    eta_max = threat.eps
    checkpoint = max(int(0.04 * steps), 1)
    delta = _random_start(threat, x, generator) if start is None else threat.project(start, x)
    loss, grad, ce, wrong = _evaluate(model, x + delta, y, loss_fn)
    found.update(delta, ce, wrong)
    eta = torch.full((len(x),), eta_max, device=x.device)
    share = torch.full((len(x),), 0.2, device=x.device)  # k / d, the moved share
    sparsity_before = torch.full((len(x),), float(d), device=x.device)
    if start is not None:
        sparsity_before = (delta.flatten(1) != 0).sum(dim=1).float()
        share = sparsity_before / d / 1.5
    best_loss, best_delta, best_grad = loss.clone(), delta.clone(), grad.clone()
    since_check = 0
    for _ in range(steps):
        with torch.no_grad():
            g = grad.flatten(1)
            k = (share * d).clamp(1, d).long()
            kth = g.abs().sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])
            direction = g.sign() * (g.abs() >= kth)
            direction = direction / direction.abs().sum(dim=1, keepdim=True).clamp_min(1e-10)
            moved = delta + per_sample(eta, x) * direction.view_as(x)
            delta = project_l1_ball(moved, threat.eps, lower=-x, upper=1.0 - x)
        loss, grad, ce, wrong = _evaluate(model, x + delta, y, loss_fn)
        found.update(delta, ce, wrong)
        better = loss > best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_delta[better], best_grad[better] = delta[better], grad[better]
        since_check += 1
        if since_check == checkpoint:
            sparsity = (best_delta.flatten(1) != 0).sum(dim=1).float()
            sparser = sparsity / sparsity_before < 0.95
            share = sparsity / d / 1.5
            eta = torch.where(sparser, torch.full_like(eta, eta_max), eta / 1.5)
            eta = eta.clamp(eta_max / 10, eta_max)
            sparsity_before = sparsity
            delta[sparser], grad[sparser] = best_delta[sparser], best_grad[sparser]
            since_check = 0
    return found, best_delta
