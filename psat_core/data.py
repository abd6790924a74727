"""Datasets of the paper's "Experimental Setup" (CIFAR-10, SVHN, TinyImageNet) plus offline digits.

Every loader returns :class:`ImageArrays`: uint8 images ``N x C x H x W`` and int64 labels ``N``.
Pixels stay in [0, 255] on disk and in [0, 1] once :meth:`ImageArrays.to_float` is called; the
per-channel ``mean``/``std`` of :class:`DatasetInfo` belong to the model's own first
(normalization) module, so attacks work in [0, 1] pixel space.

Example::

    info = dataset_info("cifar10")
    train = load_dataset("cifar10", "train", "~/data", download=True).subset(1000, seed=0)
    x = random_crop_flip(train.to_float()) if info.augment else train.to_float()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, SVHN, ImageFolder
from torchvision.datasets.utils import check_md5, download_and_extract_archive

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
        name: registry key.
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        in_channels: image channels C.
        image_size: height = width of every image.
        mean, std: per-channel statistics of the train split in [0, 1] pixel units, for the
            model's normalization layer.
        augment: whether :func:`random_crop_flip` suits the dataset (False where a horizontal
            flip changes the label's meaning, i.e. digits and house numbers).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


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
        ),
        DatasetInfo(
            name="svhn",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            augment=False,
        ),
        DatasetInfo(
            name="tinyimagenet",
            num_classes=200,
            in_channels=3,
            image_size=64,
            mean=(0.4802, 0.4481, 0.3975),
            std=(0.2770, 0.2691, 0.2821),
            augment=True,
        ),
        DatasetInfo(
            name="digits",
            num_classes=10,
            in_channels=1,
            image_size=8,
            mean=(0.3054,),
            std=(0.3760,),
            augment=False,
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` registered as ``name``; ValueError if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not under ``data_dir``; the message says where and how to get them."""


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
        name: a key of :data:`DATASETS`.
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
    dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return _LOADERS[name](Path(data_dir).expanduser(), split, download)


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


# --- loaders ------------------------------------------------------------------------------------


def _require(paths: Iterable[Path], name: str, how: str) -> None:
    """Raise one DatasetNotFoundError listing every missing path of dataset ``name``."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found: missing {', '.join(missing)}. Pass download=True (CLI: --download) "
            f"or {how}"
        )


def _warn_if_not_official(files: Iterable[tuple[Path, str]], name: str) -> None:
    """Log a warning naming the files whose md5 differs from the official release's."""
    changed = [path.name for path, md5 in files if not check_md5(path, md5)]
    if changed:
        logger.warning(
            "%s: %s differ from the official release (md5); loading them as they are",
            name,
            ", ".join(changed),
        )


class _CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 that accepts the extracted files when present, whatever their md5.

    torchvision compares every extracted pickle with the md5 of the official release and refuses
    a copy that was re-pickled (same format, other bytes) with a generic "not found or
    corrupted". Here presence is checked instead (by :func:`_load_cifar10`, which names what is
    missing), differing checksums are logged as a warning, and ``download=True`` still verifies
    the downloaded archive against ``tgz_md5``.
    """

    train_list = [[file, None] for file, _ in CIFAR10.train_list]
    test_list = [[file, None] for file, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _SVHNFile(SVHN):
    """torchvision's SVHN that accepts ``<split>_32x32.mat`` when present, whatever its md5.

    Same reason as :class:`_CIFAR10Files`; ``download=True`` still verifies the downloaded file.
    """

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


def _load_cifar10(root: Path, split: str, download: bool) -> ImageArrays:
    folder = root / CIFAR10.base_folder
    # torchvision reads the meta file and needs every batch present, whichever split is asked.
    official = [(folder / file, md5) for file, md5 in CIFAR10.train_list + CIFAR10.test_list]
    official.append((folder / CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    if not download:
        _require(
            (path for path, _ in official),
            "cifar10",
            f"extract {CIFAR10.url} into {root}",
        )
    ds = _CIFAR10Files(root=root, train=split == "train", download=download)
    _warn_if_not_official(official, "cifar10")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x H x W x C on disk
    return ImageArrays(images, torch.tensor(ds.targets, dtype=torch.int64))


def _load_svhn(root: Path, split: str, download: bool) -> ImageArrays:
    url, file, md5 = SVHN.split_list[split]
    if not download:
        _require([root / file], "svhn", f"download {url} into {root}")
    ds = _SVHNFile(root=root, split=split, download=download)
    _warn_if_not_official([(root / file, md5)], "svhn")
    # torchvision maps label 10 (digit 0) to 0 and the .mat's H x W x C x N to N x C x H x W.
    return ImageArrays(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels))


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _load_tinyimagenet(root: Path, split: str, download: bool) -> ImageArrays:
    """Labels index the wnids of ``wnids.txt`` in sorted order (the order of ImageFolder's
    class folders); "test" is the labelled ``val`` folder, per ``val/val_annotations.txt``."""
    folder = root / "tiny-imagenet-200"
    wnids_file = folder / "wnids.txt"
    if download and not wnids_file.is_file():
        download_and_extract_archive(TINY_IMAGENET_URL, str(root), md5=TINY_IMAGENET_MD5)
    split_path = folder / "train" if split == "train" else folder / "val" / "val_annotations.txt"
    _require([wnids_file, split_path], "tinyimagenet", f"extract {TINY_IMAGENET_URL} into {root}")
    wnids = sorted(wnids_file.read_text().split())
    if split == "train":
        ds = ImageFolder(str(split_path))
        if ds.classes != wnids:
            raise ValueError(
                f"class folders of {split_path} do not match the wnids of {wnids_file}"
            )
        samples = ds.samples
    else:
        label = {wnid: i for i, wnid in enumerate(wnids)}
        lines = (line.split("\t") for line in split_path.read_text().splitlines() if line.strip())
        samples = [
            (str(folder / "val" / "images" / fields[0]), label[fields[1]]) for fields in lines
        ]
    images = np.stack([_read_rgb(path) for path, _ in samples]).transpose(0, 3, 1, 2)
    labels = torch.tensor([target for _, target in samples], dtype=torch.int64)
    return ImageArrays(torch.from_numpy(np.ascontiguousarray(images)), labels)


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # some TinyImageNet JPEGs are grayscale


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _load_digits(root: Path, split: str, download: bool) -> ImageArrays:
    """scikit-learn's 1797 8 x 8 digits (values 0..16, rescaled to 0..255), split 80/20,
    stratified by label with a fixed seed, so train and test are disjoint and always the same."""
    # Imported here: scikit-learn is slow to import and only digits needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_index, test_index = train_test_split(
        np.arange(len(digits.target)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    index = train_index if split == "train" else test_index
    images = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(digits.target[index]).long())


_LOADERS: dict[str, Callable[[Path, str, bool], ImageArrays]] = {
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
    "tinyimagenet": _load_tinyimagenet,
    "digits": _load_digits,
}
