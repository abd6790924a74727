"""Datasets of the paper's "Experimental Setup" (CIFAR-10, SVHN, TinyImageNet) plus offline digits.

Every loader returns :class:`ImageArrays`: uint8 images ``N x C x H x W`` and int64 labels ``N``.
Pixels stay in [0, 255] on disk and in [0, 1] once :meth:`ImageArrays.to_float` is called; the
per-channel ``mean``/``std`` of :class:`~psat_core.settings.DatasetInfo` belong to the model's
own first (normalization) module, so attacks work in [0, 1] pixel space.

Example::

    info = dataset_info("cifar10")
    train = load_dataset("cifar10", "train", "~/data", download=True).subset(1000, seed=0)
    x = random_crop_flip(train.to_float()) if info.augment else train.to_float()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from psat_core.settings import dataset_info

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageArrays:
    """A whole split in memory.

    Attributes:
        images: uint8 tensor ``N x C x H x W`` with values in [0, 255].
        labels: int64 tensor ``N``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def to_float(self) -> torch.Tensor:
        """Images as float32 ``N x C x H x W`` in [0, 1]."""
        return self.images.float().div_(255.0)

    def subset(self, n: int, seed: int = 0) -> ImageArrays:
        """``n`` distinct samples drawn uniformly at random; the same ``seed`` gives the same ones.

        Raises ValueError unless ``0 <= n <= len(self)``.
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"subset size {n} is outside [0, {len(self)}]")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageArrays(self.images[index], self.labels[index])


def load_dataset(
    name: str, split: str, data_dir: str | os.PathLike[str], download: bool = False
) -> ImageArrays:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` into memory.

    Args:
        name: a key of :data:`~psat_core.settings.DATASETS`, whose entry names the loader.
        split: ``"train"`` or ``"test"`` (for tinyimagenet, "test" is the labelled ``val`` folder,
            since the official test images carry no labels).
        data_dir: folder holding the dataset as its official archive extracts it:
            ``cifar-10-batches-py/``, ``train_32x32.mat``/``test_32x32.mat`` (SVHN),
            ``tiny-imagenet-200/``. Ignored for digits, which ships inside scikit-learn.
        download: fetch the official archive into ``data_dir`` first when it is not there yet.

    Returns:
        :class:`ImageArrays` with ``images`` of shape ``N x C x S x S`` where C and S are the
        dataset's ``in_channels`` and ``image_size``.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetNotFoundError: files missing and ``download`` is False.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return info.load_function()(Path(data_dir).expanduser(), split, download)


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    padding_mode: str = "constant",
) -> torch.Tensor:
    """Train-time augmentation: per sample, a random ``H x W`` crop of the padded image, then a
    horizontal flip with probability 1/2 (the standard CIFAR recipe).

    Not meant for digits or SVHN (``DatasetInfo.augment`` is False there): a flip changes a
    digit's identity.

    Args:
        x: float tensor ``N x C x H x W`` on any device; not modified.
        padding: pixels added on each side before cropping (default 4); 0 leaves only the flip.
        generator: random source (on ``x``'s device or the CPU) for reproducible draws; default
            the global one.
        padding_mode: ``"constant"`` (zeros, default) or ``"reflect"`` (needs padding < H, W).

    Returns:
        A new tensor of ``x``'s shape, dtype and device; values come from ``x`` (or zeros of
        constant padding).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float N x C x H x W batch, got {x.dtype} {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding_mode not in ("constant", "reflect"):
        raise ValueError(f"padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
    n, _, h, w = x.shape
    draw_device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_device)
    flip = torch.rand(n, generator=generator, device=draw_device) < 0.5
    offsets, flip = offsets.to(x.device), flip.to(x.device)

    padded = F.pad(x, (padding,) * 4, mode=padding_mode)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # N x H
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # N x W
    batch = torch.arange(n, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    crops = crops.permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops).contiguous()


# --- loaders (each named by its dataset's DatasetInfo.loader) --------------------------------


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits(root: Path, split: str, download: bool) -> ImageArrays:
    """scikit-learn's 1797 8 x 8 digits (values 0..16, rescaled to 0..255), split 80/20,
    stratified by label with a fixed seed, so train and test are disjoint and always the same."""
    # Imported here: scikit-learn is slow to import and only digits needs it.
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    train_index, test_index = train_test_split(
        np.arange(len(digits.target)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    index = train_index if split == "train" else test_index
    images = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(digits.target[index]).long())
