"""What a psat run is configured with, importable without torch (`orchestrator.config`
validates a job with these alone; the kernels take them from here).

* the norms of the threat models (eq. 1) and the attack phases;
* :class:`AttackConfig`, the validated settings of one PGD attack (eq. 3), and each dataset's
  defaults, :func:`attack_defaults`;
* :data:`DATASETS`, one :class:`DatasetInfo` entry per dataset (its static facts, its attack
  defaults and the name of its loader, imported only when the data is loaded), :func:`dataset_info`;
* the architectures (name -> block and layers; `psat_core.models` builds them) and the
  learning-rate schedules (`psat_core.steps.make_scheduler`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NORMS = ("linf", "l2", "l1")
NORM_SYMBOLS = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}  # how reports write each norm
PHASES = ("train", "validation", "eval")
SCHEDULES = ("cosine", "multistep", "constant")
# ResNet depth -> residual block ("basic" or "bottleneck") and blocks per stage
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
# Table 5's lightweight networks: psat's name -> timm's model (1.5-4.2M parameters, as the paper's)
LIGHTWEIGHT = {
    "mobilenet_v1": "mobilenetv1_100",
    "mobilenet_v3_small": "mobilenetv3_small_100",
    "mobilenet_v3_large": "mobilenetv3_large_100",
    "ghostnet": "ghostnet_100",
}


def invalid(owner: str, field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{field} must be {allowed} (got {value!r})")


def check_positive(owner: str, field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise invalid(owner, field, value, "a number > 0")
    if not math.isfinite(value):
        raise invalid(owner, field, value, "a finite number > 0")


def check_count(owner: str, field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise invalid(owner, field, value, "an integer >= 1")


# --------------------------------------------------------------------------- attacks


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Validated settings of one PGD attack.

    Args:
        norm: one of :data:`NORMS`.
        eps: radius of the ℓp ball, > 0.
        steps: PGD iterations per restart (τ of eq. 3), >= 1.
        step_size: ℓp length of each step (α of eq. 3), > 0.
        restarts: independent random restarts, merged per example, >= 1 (default 1).
        random_start: start from a random point of the ball instead of 0 (default True).
    """

    norm: str
    eps: float
    steps: int
    step_size: float
    restarts: int = 1
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise invalid("AttackConfig", "norm", self.norm, f"one of {', '.join(NORMS)}")
        check_positive("AttackConfig", "eps", self.eps)
        check_count("AttackConfig", "steps", self.steps)
        check_positive("AttackConfig", "step_size", self.step_size)
        check_count("AttackConfig", "restarts", self.restarts)
        if not isinstance(self.random_start, bool):
            raise invalid("AttackConfig", "random_start", self.random_start, "True or False")


def _table(
    eps: Mapping[str, float],
    steps: Mapping[str, int],
    step_size: Mapping[str, float],
    restarts: int,
) -> dict[str, AttackConfig]:
    return {
        n: AttackConfig(n, eps[n], steps[n], step_size[n], restarts=restarts, random_start=True)
        for n in NORMS
    }


# CIFAR-10 / SVHN / TinyImageNet (pixels in [0, 1]). Radii: ε∞ = 8/255, ε2 = 0.5, ε1 = 12
# (Maini et al. 2020; the paper's settings). Steps: train and validation 10/10/20, eval 50/50/100
# (Madaan et al. 2021), eval with 10 restarts (Maini et al.). Step sizes: α∞ = ε∞/4 = 2/255 and
# α2 = ε2/4 (10 steps cover 2.5ε, Madry et al.'s rule); α1 = 1.0, the total ℓ1 step of Maini et
# al. (spread by L1Ball over the top 1% of |grad|).
_IMAGE_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
_IMAGE_STEP = {"linf": 2 / 255, "l2": 0.125, "l1": 1.0}
_IMAGE = {
    "train": _table(_IMAGE_EPS, {"linf": 10, "l2": 10, "l1": 20}, _IMAGE_STEP, restarts=1),
    "validation": _table(_IMAGE_EPS, {"linf": 10, "l2": 10, "l1": 20}, _IMAGE_STEP, restarts=1),
    "eval": _table(_IMAGE_EPS, {"linf": 50, "l2": 50, "l1": 100}, _IMAGE_STEP, restarts=10),
}

# scikit-learn digits: 8x8 grayscale, 17 gray levels scaled to [0, 1], d = 64. ε∞ = 0.15 is
# about 2.4 gray levels; ε2 = 0.6 < 8 * 0.15 = 1.2 (the ℓ∞ box's corner) and ε1 = 2 (two pixels
# fully flipped) < 8 * ε2, so no ball contains another. Measured (bench/specialists.py, paper
# protocol): at these radii each AT specialist is the most robust model on its own norm and
# weakest on another, as in the paper's Table 3. CIFAR-10's ratios (ε∞·√d/ε2 = 3.5,
# ε∞·d/ε1 = 8, i.e. ε2 = 0.34, ε1 = 1.2 here) leave ℓ2 and ℓ1 too weak on 64 pixels: every
# specialist keeps 86-91% on both and AT_ℓ2 beats AT_ℓ1 on ℓ1. Few steps keep CPU training and
# per-epoch validation quick (validation: twice the training steps, one restart); the final
# evaluation's PGD takes 20/20/40 steps and 3 restarts. The ℓ1 step moves
# L1Ball.MIN_COORDINATES = 8 pixels (the top 1% of 64 would be one).
_DIGITS_EPS = {"linf": 0.15, "l2": 0.6, "l1": 2.0}
_DIGITS_STEP = {"linf": 0.075, "l2": 0.3, "l1": 0.5}
_DIGITS = {
    "train": _table(_DIGITS_EPS, {"linf": 5, "l2": 5, "l1": 10}, _DIGITS_STEP, 1),
    "validation": _table(_DIGITS_EPS, {"linf": 10, "l2": 10, "l1": 20}, _DIGITS_STEP, 1),
    "eval": _table(
        _DIGITS_EPS, {"linf": 20, "l2": 20, "l1": 40}, {"linf": 0.0375, "l2": 0.15, "l1": 0.25}, 3
    ),
}


def attack_defaults(
    dataset: str, phase: str, overrides: Mapping[str, Mapping[str, object]] | None = None
) -> dict[str, AttackConfig]:
    """The attack settings of ``dataset`` for ``phase``, keyed by norm (``"linf", "l2", "l1"``).

    ``"eval"`` (the final evaluation) is stronger than ``"validation"`` (per-epoch validation: one
    restart, and fewer steps on full-size images), itself at least ``"train"``. ``overrides``
    maps a norm to the :class:`AttackConfig` fields to replace, e.g. ``{"l1": {"steps": 50}}``;
    the result is validated by :class:`AttackConfig`.

    Raises:
        ValueError: unknown dataset, phase, norm or field, or an invalid value.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if phase not in PHASES:
        raise ValueError(f"unknown attack phase {phase!r}; allowed: {', '.join(PHASES)}")
    configs = dict(DATASETS[dataset].attacks[phase])
    fields = {f.name for f in dataclasses.fields(AttackConfig)} - {"norm"}
    for norm, changes in (overrides or {}).items():
        if norm not in configs:
            raise ValueError(
                f"attack override for unknown norm {norm!r}; allowed: {', '.join(NORMS)}"
            )
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ValueError(
                f"attack override for {norm!r} has unknown field(s) {unknown}; "
                f"allowed: {', '.join(sorted(fields))}"
            )
        configs[norm] = dataclasses.replace(configs[norm], **changes)
    return configs


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset, registered once in :data:`DATASETS`: its static facts, its attack defaults
    and where its loader is (after MadryLab/robustness ``datasets.py``).

    Attributes:
        name: registry key.
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        in_channels: image channels C.
        image_size: height = width of every image.
        mean, std: per-channel statistics of the train split in [0, 1] pixel units, for the
            model's normalization layer.
        augment: whether :func:`random_crop_flip` suits the dataset (False where a horizontal
            flip changes the label's meaning, i.e. digits and house numbers).
        train_images, test_images: the sizes of the official splits.
        loader: ``"module:function"`` naming its loader,
            ``function(root: Path, split: str, download: bool) -> ImageArrays`` (see
            :func:`psat_core.data.load_dataset`); imported only by :meth:`load_function`, so this
            module stays importable without torch.
        attacks: phase (:data:`PHASES`) -> norm -> :class:`AttackConfig`, the defaults
            :func:`attack_defaults` starts from.
        files: ``"module:function"`` naming the torch-free check of its files in a data dir,
            ``function(root: Path, download: bool)`` (:mod:`psat_core.dataset_files`); None for
            a dataset that ships inside a package.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    train_images: int
    test_images: int
    loader: str
    attacks: Mapping[str, Mapping[str, AttackConfig]] = field(repr=False, hash=False)
    files: str | None = None

    def check_files(self, root: Path, download: bool) -> None:
        """Check the dataset's files in `root` (:attr:`files`, torch-free), if it has any."""
        if self.files is not None:
            module, _, function = self.files.partition(":")
            getattr(importlib.import_module(module), function)(root, download)

    def load_function(self) -> Callable:
        """The loader named by :attr:`loader`, imported now (torch and perhaps torchvision)."""
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)


# The dataset registry. A new dataset is one entry here: its facts, its attack defaults (a table
# above) and its loader's "module:function" (a function beside those of psat_core/vision_sets.py).
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="cifar10",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            augment=True,
            train_images=50000,
            test_images=10000,
            loader="psat_core.vision_sets:load_cifar10",
            files="psat_core.dataset_files:check_cifar10",
            attacks=_IMAGE,
        ),
        DatasetInfo(
            name="svhn",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            augment=False,
            train_images=73257,
            test_images=26032,
            loader="psat_core.vision_sets:load_svhn",
            files="psat_core.dataset_files:check_svhn",
            attacks=_IMAGE,
        ),
        DatasetInfo(
            name="tinyimagenet",
            num_classes=200,
            in_channels=3,
            image_size=64,
            mean=(0.4802, 0.4481, 0.3975),
            std=(0.2770, 0.2691, 0.2821),
            augment=True,
            train_images=100000,
            test_images=10000,
            loader="psat_core.vision_sets:load_tinyimagenet",
            files="psat_core.dataset_files:check_tinyimagenet",
            attacks=_IMAGE,
        ),
        DatasetInfo(
            name="digits",
            num_classes=10,
            in_channels=1,
            image_size=8,
            mean=(0.3054,),
            std=(0.3760,),
            augment=False,
            train_images=1437,
            test_images=360,
            loader="psat_core.data:load_digits",
            attacks=_DIGITS,
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` registered as ``name``; ValueError if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
