"""The on-disk datasets through torchvision: CIFAR-10, SVHN and the tiny-imagenet-200 layout.

Loaded by :func:`psat_core.data.load_dataset`, which imports this module only when one of them
is asked for (torchvision is slow to import).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, SVHN, ImageFolder
from torchvision.datasets.utils import check_md5, download_and_extract_archive

from psat_core.data import ImageArrays, require_files

logger = logging.getLogger(__name__)


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
    corrupted". Here presence is checked instead (by :func:`load_cifar10`, which names what is
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


def load_cifar10(root: Path, split: str, download: bool) -> ImageArrays:
    folder = root / CIFAR10.base_folder
    # torchvision reads the meta file and needs every batch present, whichever split is asked.
    official = [(folder / file, md5) for file, md5 in CIFAR10.train_list + CIFAR10.test_list]
    official.append((folder / CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    if not download:
        require_files(
            (path for path, _ in official),
            "cifar10",
            f"extract {CIFAR10.url} into {root}",
        )
    ds = _CIFAR10Files(root=root, train=split == "train", download=download)
    _warn_if_not_official(official, "cifar10")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x H x W x C on disk
    return ImageArrays(images, torch.tensor(ds.targets, dtype=torch.int64))


def load_svhn(root: Path, split: str, download: bool) -> ImageArrays:
    url, file, md5 = SVHN.split_list[split]
    if not download:
        require_files([root / file], "svhn", f"download {url} into {root}")
    ds = _SVHNFile(root=root, split=split, download=download)
    _warn_if_not_official([(root / file, md5)], "svhn")
    # torchvision maps label 10 (digit 0) to 0 and the .mat's H x W x C x N to N x C x H x W.
    return ImageArrays(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels))


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def load_tinyimagenet(root: Path, split: str, download: bool) -> ImageArrays:
    """Labels index the wnids of ``wnids.txt`` in sorted order (the order of ImageFolder's
    class folders); "test" is the labelled ``val`` folder, per ``val/val_annotations.txt``."""
    folder = root / "tiny-imagenet-200"
    wnids_file = folder / "wnids.txt"
    if download and not wnids_file.is_file():
        download_and_extract_archive(TINY_IMAGENET_URL, str(root), md5=TINY_IMAGENET_MD5)
    split_path = folder / "train" if split == "train" else folder / "val" / "val_annotations.txt"
    how = f"extract {TINY_IMAGENET_URL} into {root}"
    require_files([wnids_file, split_path], "tinyimagenet", how)
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
