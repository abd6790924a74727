"""Multi-perturbation robustness evaluation: a protocol with sanity checks (after auto-attack).

Protocol: clean predictions first; then the attacks in order, each seeded and run only on the
points still robust for its norm (classified correctly on the clean input and under the
attacks of that norm before it; AutoAttack's rule); the adversarial predictions are recomputed
from the returned ``x_adv``. Reported, as fractions in [0, 1] (Table 1's columns):

* ``clean``: clean accuracy;
* one key per norm (``linf``, ``l2``, ``l1``): accuracy under that norm's attacks. An attack
  named ``"<norm>/<variant>"`` (an adaptive or a third-party attack) joins its norm: a point
  counts for the norm only if it withstands all of them. Each attack also gets its own key:
  the accuracy after it and the attacks of its norm before it (so the points it found are the
  drop from the previous one, :meth:`PerSampleResult.found`);
* ``max``: accuracy under the worst case, a point counting only if it withstands every attack;
* ``avg``: the mean of the per-norm accuracies;
* ``trade_off``: Acc_trade-off, the mean of all the above (:func:`trade_off`).

Every attack's output is checked (auto-attack ``checks.py``): ``x_adv`` finite, in [0, 1], of the
input's shape, and within the attack's ε-ball up to rounding; robust <= clean. A failed check
raises :class:`SanityCheckError`: it means a bug in an attack or a model, not a weak defence. Two
assumptions of gradient attacks are checked with a logged warning: outputs are logits (not
probabilities) and the forward pass is deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Collection, Mapping

import torch
from torch import Tensor, nn

from psat_core.attacks.pgd import PGD, eval_mode
from psat_core.settings import NORMS

__all__ = [
    "TABLE1_KEYS",
    "SanityCheckError",
    "PerSampleResult",
    "trade_off",
    "evaluate_per_sample",
    "norm_of",
    "summarize",
    "example_scores",
    "standard_error",
    "paired_bootstrap",
    "evaluate_robustness",
]

log = logging.getLogger(__name__)

TABLE1_KEYS = ("clean", *NORMS, "max", "avg")

# ||x_adv - x||_p may exceed eps by rounding only: the box clip (float32 ulp) and, for l1, the
# sort/cumsum of the projection (relative error ~1e-6).
_REL_TOL = 1e-4
_ABS_TOL = 1e-6


class SanityCheckError(RuntimeError):
    """An evaluation invariant failed: a bug in an attack or in the model, not a weak defence."""


def trade_off(row: Mapping[str, float | Tensor], norms: tuple[str, ...] = NORMS) -> float | Tensor:
    """Acc_trade-off (Table 1): the mean of clean, the per-norm, max and avg accuracies.

    Works in whatever unit ``row`` uses (percent or fraction), and image by image on tensors
    (`example_scores`). ``norms`` names the per-norm columns (default ``("linf", "l2", "l1")``).

    Example::

        >>> row = {"clean": 82.28, "linf": 40.33, "l2": 60.28, "l1": 68.13}
        >>> row.update({"max": 40.78, "avg": 56.32})
        >>> round(trade_off(row), 2)  # CIFAR-10, PSAT: 58.02% in Table 1
        58.02
    """
    keys = ("clean", *norms, "max", "avg")
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"trade_off needs columns {list(keys)}; missing {missing}")
    return sum(row[k] for k in keys) / len(keys)


@dataclasses.dataclass(frozen=True)
class PerSampleResult:
    """Per-example outcome of :func:`evaluate_per_sample`, all tensors on the CPU.

    Attributes:
        attack_names: the attacks, in evaluation order.
        correct: ``"clean"`` and each attack name -> bool ``(N,)``: still classified correctly
            after that attack and the ones of its norm before it.
        probes: the same keys -> the ``probe`` outputs ``(N, ...)`` on the inputs evaluated for
            that key (``x_adv`` for attacked points, ``x`` for the others); empty without a probe.
        examples: the attacks asked to ``keep`` theirs -> ``(N, *)`` the inputs evaluated for
            them (``x_adv`` where :meth:`attacked`, ``x`` elsewhere).
    """

    attack_names: tuple[str, ...]
    correct: dict[str, Tensor]
    probes: dict[str, Tensor]
    examples: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def attacked(self, name: str) -> Tensor:
        """Bool ``(N,)``: the points attack ``name`` ran on (still robust for its norm)."""
        before = "clean"
        for other in self.attack_names[: self.attack_names.index(name)]:
            if norm_of(other) == norm_of(name):
                before = other
        return self.correct[before]

    def found(self, name: str) -> Tensor:
        """Bool ``(N,)``: the points attack ``name`` was the first of its norm to break."""
        return self.attacked(name) & ~self.correct[name]


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SanityCheckError(message)


def _check_adversarial(name: str, attack: PGD, x: Tensor, x_adv: Tensor) -> None:
    """x_adv has x's shape, is finite, lies in [0, 1] and within the attack's ε-ball."""
    _check(
        x_adv.shape == x.shape,
        f"attack {name!r}: x_adv shape {tuple(x_adv.shape)} != input shape {tuple(x.shape)}",
    )
    _check(bool(torch.isfinite(x_adv).all()), f"attack {name!r}: x_adv contains NaN or inf")
    low, high = x_adv.min().item(), x_adv.max().item()
    _check(low >= 0.0 and high <= 1.0, f"attack {name!r}: x_adv outside [0, 1] ({low}, {high})")
    threat = getattr(attack, "threat", None)
    if threat is not None:
        dist = threat.distance((x_adv - x).double())
        bound = threat.eps * (1 + _REL_TOL) + _ABS_TOL
        worst = dist.max().item()
        _check(
            worst <= bound,
            f"attack {name!r}: max ||x_adv - x||_{threat.norm[1:]} = {worst:.6g} exceeds "
            f"eps = {threat.eps:.6g} (+ tolerance)",
        )


def _check_assumptions(model: nn.Module, x: Tensor) -> None:
    """Warn when outputs look like probabilities or the forward pass is not deterministic."""
    with torch.no_grad():
        first, second = model(x), model(x)
    _check(bool(torch.isfinite(first).all()), "model outputs contain NaN or inf on clean inputs")
    rows = first.float()
    if bool((rows >= 0).all()) and torch.allclose(
        rows.sum(1), torch.ones(len(rows), device=rows.device)
    ):
        log.warning("model outputs sum to 1 per row: attacks expect logits, not probabilities")
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        log.warning("model forward is not deterministic: robust accuracy may be overestimated")


def attack_seed(seed: int, name: str, start: int) -> int:
    """The seed of attack ``name`` on the batch starting at example ``start``: a row evaluated
    twice (or a one-member ensemble and its member) draws the same random starts."""
    return zlib.crc32(f"{seed}/{name}/{start}".encode())


Progress = Callable[[str, int, int, float], None]


def evaluate_per_sample(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attacks: Mapping[str, PGD],
    batch_size: int = 256,
    probe: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    keep: Collection[str] = (),
    first: int = 0,
) -> PerSampleResult:
    """Per-example correctness under each attack (see the module docstring for the protocol).

    Attacks run in order; each runs only on the points still robust for its norm (correct on
    clean inputs and under the attacks of that norm before it, as AutoAttack does).

    Args:
        model: an ``nn.Module`` returning logits; evaluated in eval mode on its own device (its
            previous training flags are restored afterwards).
        images: ``(N, *)`` inputs in [0, 1], on any device.
        labels: ``(N,)`` class indices.
        attacks: name -> attack, e.g. ``make_attacks(attack_defaults("cifar10", "eval"))``.
        batch_size: examples per batch, >= 1 (default 256).
        probe: optional ``f(x) -> (B, ...)`` run on every evaluated batch (e.g. which ensemble
            member answers), collected in :attr:`PerSampleResult.probes`.
        seed: seeds each attack per batch (:func:`attack_seed`) with the batch's position,
            ``first + start``: ``first`` is that of ``images[0]`` in a larger set evaluated in
            chunks, so a chunk draws what the whole set would in its batches.
        progress: called after each attack with its name, the points still robust for its
            norm, the number of examples and an estimate of the seconds left.
        keep: attacks whose adversarial inputs are kept (:attr:`PerSampleResult.examples`).
        Attacks with ``indexed = True`` are also given ``index=``, the positions in ``images``
        of the points they attack.
    """
    _check_arguments(images, labels, attacks, batch_size, keep)
    names = tuple(attacks)
    device = _device_of(model, images.device)
    batches = [
        (start, images[start : start + batch_size], labels[start : start + batch_size])
        for start in range(0, len(images), batch_size)
    ]
    correct: dict[str, Tensor] = {}
    probes: dict[str, list[Tensor]] = {}
    examples: dict[str, list[Tensor]] = {name: [] for name in keep}
    started, done = time.monotonic(), 0.0  # done: gradient passes x points attacked so far
    cuda = [device] if device.type == "cuda" else []
    # the attacks' seeds leave the caller's random state as it was (e.g. a training loop's)
    with eval_mode(model), torch.random.fork_rng(devices=cuda):
        _check_assumptions(model, batches[0][1].to(device))
        with torch.no_grad():
            clean = [model(x.to(device)).argmax(1).cpu() == y.cpu() for _, x, y in batches]
        correct["clean"] = torch.cat(clean)
        if probe is not None:
            probes["clean"] = [probe(x.to(device)).cpu() for _, x, _ in batches]
        robust = {norm_of(name): correct["clean"] for name in names}
        for index, (name, attack) in enumerate(attacks.items()):
            norm = norm_of(name)
            survived, probed = [], []
            for start, x, y in batches:
                x, y = x.to(device), y.to(device)
                attacked = robust[norm][start : start + len(x)].to(device).nonzero().squeeze(1)
                x_eval = _attacked_batch(model, name, attack, x, y, attacked, start, seed, first)
                with torch.no_grad():
                    ok = model(x_eval).argmax(1) == y
                    if probe is not None:
                        probed.append(probe(x_eval).cpu())
                survived.append(ok.cpu())
                if name in examples:
                    examples[name].append(x_eval.cpu())
                done += getattr(attack, "cost", 1) * len(attacked)
            robust[norm] = robust[norm] & torch.cat(survived)
            correct[name] = robust[norm]
            if probe is not None:
                probes[name] = probed
            if progress is not None:
                left = sum(
                    getattr(later, "cost", 1) * int(robust[norm_of(n)].sum())
                    for n, later in list(attacks.items())[index + 1 :]
                )  # gradient passes still to come, at the rate so far
                rate = (time.monotonic() - started) / max(done, 1.0)
                progress(name, int(robust[norm].sum()), len(images), rate * left)
    return PerSampleResult(
        attack_names=names,
        correct=correct,
        probes={k: torch.cat(v) for k, v in probes.items()},
        examples={k: torch.cat(v) for k, v in examples.items()},
    )


def _check_arguments(
    images: Tensor,
    labels: Tensor,
    attacks: Mapping[str, PGD],
    batch_size: int,
    keep: Collection[str],
) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be an integer >= 1 (got {batch_size!r})")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images, at least one (got {len(images)}, {len(labels)})"
        )
    if not attacks:
        raise ValueError("evaluate.attacks must name at least one attack")
    if unknown := sorted(set(keep) - set(attacks)):
        raise ValueError(f"evaluate.keep names no attack of this evaluation: {unknown}")


def _attacked_batch(
    model: nn.Module,
    name: str,
    attack: PGD,
    x: Tensor,
    y: Tensor,
    attacked: Tensor,
    start: int,
    seed: int,
    first: int,
) -> Tensor:
    """The batch with attack `name`'s examples at the positions `attacked` (the points still
    robust), each batch's attack seeded from (`seed`, `name`, `first + start`); checked."""
    x_eval = x.clone()
    if len(attacked):
        torch.manual_seed(attack_seed(seed, name, first + start))
        at = {"index": start + attacked} if getattr(attack, "indexed", False) else {}
        x_adv = attack(model, x[attacked], y[attacked], **at)
        _check_adversarial(name, attack, x[attacked], x_adv)
        x_eval[attacked] = x_adv
    return x_eval


def norm_of(attack_name: str) -> str:
    """The norm an attack named ``"<norm>"`` or ``"<norm>/<variant>"`` counts under."""
    return attack_name.split("/", 1)[0]


def example_scores(result: PerSampleResult) -> dict[str, Tensor]:
    """Table 1's columns image by image (float ``(N,)``): ``clean``, one per norm (withstood
    every attack of that norm), ``max`` (every attack), ``avg`` (the mean over norms) and
    ``trade_off`` (`trade_off` of the others). Each column's accuracy is its vector's mean, so
    two rows evaluated on the same images can be compared image by image (`paired_bootstrap`)."""
    names = result.attack_names
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(norm_of(name), []).append(name)
    scores = {"clean": result.correct["clean"].float()}
    for norm, members in groups.items():
        scores[norm] = torch.stack([result.correct[n] for n in members]).all(dim=0).float()
    scores["max"] = torch.stack([result.correct[n] for n in names]).all(dim=0).float()
    scores["avg"] = torch.stack([scores[norm] for norm in groups]).mean(dim=0)
    scores["trade_off"] = trade_off(scores, norms=tuple(groups))
    return scores


def summarize(result: PerSampleResult) -> dict[str, float]:
    """Table 1's accuracies (fractions) from per-example results: the means of
    `example_scores`, and one per ``"<norm>/<variant>"`` attack."""
    row = {key: ok.float().mean().item() for key, ok in result.correct.items()}
    row |= {key: scores.mean().item() for key, scores in example_scores(result).items()}
    for name in result.attack_names:
        norm = norm_of(name)
        _check(row[name] <= row["clean"], f"robust accuracy under {name!r} exceeds clean accuracy")
        _check(row[norm] <= row[name], f"accuracy under {norm!r} exceeds that under {name!r}")
        _check(row["max"] <= row[norm], f"worst-case accuracy exceeds accuracy under {norm!r}")
    return row


def standard_error(scores: Tensor) -> float:
    """The standard error of an accuracy, the mean of ``scores`` over N images: sd / sqrt(N)."""
    n = scores.numel()
    return 0.0 if n < 2 else (scores.double().std() / n**0.5).item()


def paired_bootstrap(
    ours: Tensor,
    theirs: Tensor,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    batch_elements: int = 1 << 22,
) -> tuple[float, float, float]:
    """``mean(ours) - mean(theirs)`` and its ``level`` percentile interval, the two rows paired.

    Scores are ``(N,)``, one per image, or ``(S, N)``: S training seeds of each row scored on
    the same N images. Each of ``resamples`` resamplings draws S seeds with replacement and,
    within each seed drawn, N images with replacement (a two-stage bootstrap): with several
    seeds the interval covers training noise as well as image noise. The resamplings are drawn
    in batches of at most ``batch_elements`` indices (32 MB), whatever N and S.
    """
    if ours.shape != theirs.shape or ours.dim() not in (1, 2) or not ours.numel():
        raise ValueError(
            f"paired scores need one shape, (N,) or (seeds, N), got {ours.shape} and {theirs.shape}"
        )
    differences = (ours - theirs).double().reshape(-1, ours.shape[-1])  # (S, N)
    seeds, images = differences.shape
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    per_batch = max(1, batch_elements // (seeds * images))
    for start in range(0, resamples, per_batch):
        count = min(per_batch, resamples - start)
        rows = torch.zeros(count, seeds, 1, dtype=torch.long)
        if seeds > 1:
            rows = torch.randint(seeds, (count, seeds, 1), generator=generator)
        picks = torch.randint(images, (count, seeds, images), generator=generator)
        means[start : start + count] = differences[rows, picks].mean(dim=(1, 2))
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return differences.mean().item(), low.item(), high.item()


def evaluate_robustness(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attacks: Mapping[str, PGD],
    batch_size: int = 256,
) -> dict[str, float]:
    """Clean and adversarial accuracies of Table 1, as fractions in [0, 1].

    Keys: ``clean``, each attack's name, ``max``, ``avg``, ``trade_off``. See
    :func:`evaluate_per_sample` for the arguments and :func:`summarize` for the aggregation.
    """
    return summarize(evaluate_per_sample(model, images, labels, attacks, batch_size))
