"""The on-disk datasets through torchvision: CIFAR-10, SVHN and the tiny-imagenet-200 layout.

Loaded by :func:`psat_core.data.load_dataset`, which imports this module only when one of them
is asked for (torchvision is slow to import).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, SVHN, ImageFolder
from torchvision.datasets.utils import download_and_extract_archive

from psat_core.data import ImageArrays
from psat_core.dataset_files import (
    CIFAR10_FOLDER,
    CIFAR10_TEST,
    CIFAR10_TRAIN,
    TINY_IMAGENET_MD5,
    TINY_IMAGENET_URL,
    cifar10_files,
    read_cifar10_batch,
    require_files,
    warn_if_not_official,
)
from psat_core.dataset_files import SVHN as SVHN_FILES


class _SVHNFile(SVHN):
    """torchvision's SVHN that accepts ``<split>_32x32.mat`` when present, whatever its md5.

    torchvision compares the file with the md5 of the official release and refuses a copy that
    was re-saved (same format, other bytes) with a generic "not found or corrupted"; a differing
    md5 is logged as a warning instead. ``download=True`` still verifies the downloaded file.
    """

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


def load_cifar10(root: Path, split: str, download: bool) -> ImageArrays:
    """The python batches of CIFAR-10 (torchvision's layout and download, which checks the
    archive's md5), read with `dataset_files.read_cifar10_batch`: no file in `root` can run
    code."""
    official = cifar10_files(root)
    if download and not all(path.is_file() for path, _ in official):
        download_and_extract_archive(
            CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
        )
    require_files((path for path, _ in official), "cifar10", f"extract {CIFAR10.url} into {root}")
    warn_if_not_official(official, "cifar10")
    files = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
    batches = [read_cifar10_batch(root / CIFAR10_FOLDER / file) for file, _ in files]
    images = torch.from_numpy(np.concatenate([data for data, _ in batches]))
    labels = torch.tensor([label for _, batch in batches for label in batch], dtype=torch.int64)
    return ImageArrays(images.contiguous(), labels)


def load_svhn(root: Path, split: str, download: bool) -> ImageArrays:
    url, file, md5 = SVHN_FILES[split]
    if not download:
        require_files([root / file], "svhn", f"download {url} into {root}")
    ds = _SVHNFile(root=root, split=split, download=download)
    warn_if_not_official([(root / file, md5)], "svhn")
    # torchvision maps label 10 (digit 0) to 0 and the .mat's H x W x C x N to N x C x H x W.
    return ImageArrays(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels))


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
