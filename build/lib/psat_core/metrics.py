"""Multi-perturbation robustness evaluation: a protocol with sanity checks (after auto-attack).

Protocol, per batch: clean predictions first; each attack then runs only on the points still
classified correctly (a misclassified clean point counts as non-robust under every attack); the
adversarial predictions are recomputed from the returned ``x_adv``. Reported, as fractions in
[0, 1] (Table 1's columns):

* ``clean``: clean accuracy;
* one key per norm (``linf``, ``l2``, ``l1``): accuracy under that norm's attacks. An attack
  named ``"<norm>/<variant>"`` (an adaptive or a third-party attack) joins its norm: a point
  counts for the norm only if it withstands all of them, and each variant also gets its own key;
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
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from psat_core.attacks import NORMS, PGD, eval_mode

__all__ = [
    "TABLE1_KEYS",
    "SanityCheckError",
    "PerSampleResult",
    "trade_off",
    "evaluate_per_sample",
    "norm_of",
    "summarize",
    "evaluate_robustness",
    "subset_indices",
]

log = logging.getLogger(__name__)

TABLE1_KEYS = ("clean", *NORMS, "max", "avg")

# ||x_adv - x||_p may exceed eps by rounding only: the box clip (float32 ulp) and, for l1, the
# sort/cumsum of the projection (relative error ~1e-6).
_REL_TOL = 1e-4
_ABS_TOL = 1e-6


class SanityCheckError(RuntimeError):
    """An evaluation invariant failed: a bug in an attack or in the model, not a weak defence."""


def trade_off(row: Mapping[str, float], norms: tuple[str, ...] = NORMS) -> float:
    """Acc_trade-off (Table 1): the mean of clean, the per-norm, max and avg accuracies.

    Works in whatever unit ``row`` uses (percent or fraction). ``norms`` names the per-norm
    columns (default ``("linf", "l2", "l1")``).

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
    return sum(float(row[k]) for k in keys) / len(keys)


@dataclasses.dataclass(frozen=True)
class PerSampleResult:
    """Per-example outcome of :func:`evaluate_per_sample`, all tensors on the CPU.

    Attributes:
        attack_names: the attacks, in evaluation order.
        correct: ``"clean"`` and each attack name -> bool ``(N,)``: classified correctly (under
            that attack: the clean point was correct and the adversarial one still is).
        probes: the same keys -> the ``probe`` outputs ``(N, ...)`` on the inputs evaluated for
            that key (``x_adv`` for attacked points, ``x`` for the others); empty without a probe.
    """

    attack_names: tuple[str, ...]
    correct: dict[str, Tensor]
    probes: dict[str, Tensor]


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


def evaluate_per_sample(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attacks: Mapping[str, PGD],
    batch_size: int = 256,
    probe: Callable[[Tensor], Tensor] | None = None,
) -> PerSampleResult:
    """Per-example correctness under each attack (see the module docstring for the protocol).

    Args:
        model: an ``nn.Module`` returning logits; evaluated in eval mode on its own device (its
            previous training flags are restored afterwards).
        images: ``(N, *)`` inputs in [0, 1], on any device.
        labels: ``(N,)`` class indices.
        attacks: name -> attack, e.g. ``make_attacks(attack_defaults("cifar10", "eval"))``.
        batch_size: examples per batch, >= 1 (default 256).
        probe: optional ``f(x) -> (B, ...)`` run on every evaluated batch (e.g. which ensemble
            member answers), collected in :attr:`PerSampleResult.probes`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be an integer >= 1 (got {batch_size!r})")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images, at least one (got {len(images)}, {len(labels)})"
        )
    if not attacks:
        raise ValueError("evaluate.attacks must name at least one attack")
    names = tuple(attacks)
    keys = ("clean", *names)
    correct: dict[str, list[Tensor]] = {k: [] for k in keys}
    probes: dict[str, list[Tensor]] = {k: [] for k in keys}
    device = _device_of(model, images.device)
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            if start == 0:
                _check_assumptions(model, x)
            evaluated = {"clean": x}
            with torch.no_grad():
                clean_ok = model(x).argmax(1) == y
            correct["clean"].append(clean_ok.cpu())
            attacked = clean_ok.nonzero().squeeze(1)  # auto-attack: attack only robust points
            for name, attack in attacks.items():
                x_eval = x.clone()
                if len(attacked):
                    x_adv = attack(model, x[attacked], y[attacked])
                    _check_adversarial(name, attack, x[attacked], x_adv)
                    x_eval[attacked] = x_adv
                with torch.no_grad():
                    robust = clean_ok & (model(x_eval).argmax(1) == y)
                _check(
                    int(robust.sum()) <= int(clean_ok.sum()),
                    f"attack {name!r}: more points robust than clean",
                )
                correct[name].append(robust.cpu())
                evaluated[name] = x_eval
            if probe is not None:
                with torch.no_grad():
                    for key in keys:
                        probes[key].append(probe(evaluated[key]).cpu())
    return PerSampleResult(
        attack_names=names,
        correct={k: torch.cat(v) for k, v in correct.items()},
        probes={k: torch.cat(v) for k, v in probes.items()} if probe is not None else {},
    )


def norm_of(attack_name: str) -> str:
    """The norm an attack named ``"<norm>"`` or ``"<norm>/<variant>"`` counts under."""
    return attack_name.split("/", 1)[0]


def summarize(result: PerSampleResult) -> dict[str, float]:
    """Table 1's accuracies (fractions) from per-example results: ``clean``, one per norm (the
    per-example worst over that norm's attacks), ``max`` (correct under every attack), ``avg``
    (mean over norms), ``trade_off``, and one per ``"<norm>/<variant>"`` attack."""
    names = result.attack_names
    row = {key: ok.float().mean().item() for key, ok in result.correct.items()}
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(norm_of(name), []).append(name)
    for norm, members in groups.items():
        survived = torch.stack([result.correct[n] for n in members]).all(dim=0)
        row[norm] = survived.float().mean().item()
    every = torch.stack([result.correct[n] for n in names]).all(dim=0)
    row["max"] = every.float().mean().item()
    row["avg"] = sum(row[norm] for norm in groups) / len(groups)
    row["trade_off"] = trade_off(row, norms=tuple(groups))
    for name in names:
        norm = norm_of(name)
        _check(row[name] <= row["clean"], f"robust accuracy under {name!r} exceeds clean accuracy")
        _check(row[norm] <= row[name], f"accuracy under {norm!r} exceeds that under {name!r}")
        _check(row["max"] <= row[norm], f"worst-case accuracy exceeds accuracy under {norm!r}")
    return row


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


def subset_indices(n_total: int, n: int, seed: int) -> Tensor:
    """A fixed-seed random subset of ``range(n_total)`` of size ``min(n, n_total)``, sorted.

    The same ``(n_total, n, seed)`` gives the same indices on every machine (CPU generator).
    ``n >= n_total`` selects everything.
    """
    for field, value in (("n_total", n_total), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"subset_indices.{field} must be an integer >= 1 (got {value!r})")
    if n >= n_total:
        return torch.arange(n_total)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:n].sort().values
