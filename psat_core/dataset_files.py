"""The files of the on-disk datasets, checked without torch: present, the official release's
(md5, else a warning naming them) and, for CIFAR-10's pickled batches, readable by an unpickler
that admits only numpy arrays and builtins. The CLI runs these checks before Ray, torch or
MLflow load and before anything is written; the loaders (`vision_sets`) run them again.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
# the official release's files and their md5 (torchvision's CIFAR10 lists the same)
CIFAR10_TRAIN = (
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
)
CIFAR10_TEST = (("test_batch", "40351d587109b95175f43aff81a1287e"),)
CIFAR10_META = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
SVHN = {  # split -> (url, file, md5)
    "train": (
        "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
        "train_32x32.mat",
        "e26dedcc434d2e4c54c9b2d4a06d8373",
    ),
    "test": (
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
        "test_32x32.mat",
        "eb5a983be6a315427106f1b164d9cef3",
    ),
}
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not in `data_dir` and downloading was not allowed."""


def require_files(paths: Iterable[Path], name: str, how: str) -> None:
    """Raise one DatasetNotFoundError listing every missing path of dataset ``name``."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found: missing {', '.join(missing)}. Pass download=True (CLI: --download) "
            f"or {how}"
        )


def warn_if_not_official(files: Iterable[tuple[Path, str]], name: str) -> None:
    """Log a warning naming the files whose md5 differs from the official release's."""
    changed = [path.name for path, md5 in files if _md5(path) != md5]
    if changed:
        logger.warning(
            "%s: %s differ from the official release (md5); loading them as they are",
            name,
            ", ".join(changed),
        )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _CIFAR10Unpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's batches are made of: builtins and numpy arrays.

    A pickle can name any callable to run while loading; files in `data_dir` are data, so any
    other global is refused before it is looked up.
    """

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One batch file: images N x 3 x 32 x 32 (rows R(1024) G(1024) B(1024)) and labels.

    Raises:
        ValueError: not a CIFAR-10 batch (corrupt, another format, or a pickle that would run
            code), naming the file.
    """
    try:
        with open(path, "rb") as f:
            batch = _CIFAR10Unpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = [int(label) for label in batch.get("labels", batch.get("fine_labels"))]
    except Exception as err:  # any failure to parse is the same user fault: a bad file
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err}); "
            f"replace it with the file from {CIFAR10_URL}"
        ) from None
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def cifar10_files(root: Path) -> list[tuple[Path, str]]:
    folder = root / CIFAR10_FOLDER
    return [(folder / file, md5) for file, md5 in (*CIFAR10_TRAIN, *CIFAR10_TEST, CIFAR10_META)]


def check_cifar10(root: Path, download: bool) -> None:
    files = cifar10_files(root)
    if download and not all(path.is_file() for path, _ in files):
        return  # the loader downloads the archive (and checks its md5)
    require_files((path for path, _ in files), "cifar10", f"extract {CIFAR10_URL} into {root}")
    for path, _ in files[:-1]:  # every batch is data, before anything is written or started
        read_cifar10_batch(path)
    warn_if_not_official(files, "cifar10")


def check_svhn(root: Path, download: bool) -> None:
    if download:
        return  # torchvision downloads and checks each split's file
    for url, file, md5 in SVHN.values():
        require_files([root / file], "svhn", f"download {url} into {root}")
        warn_if_not_official([(root / file, md5)], "svhn")


def tinyimagenet_files(root: Path) -> list[Path]:
    folder = root / "tiny-imagenet-200"
    return [folder / "wnids.txt", folder / "train", folder / "val" / "val_annotations.txt"]


def check_tinyimagenet(root: Path, download: bool) -> None:
    files = tinyimagenet_files(root)
    if download and not files[0].is_file():
        return  # the loader downloads the archive (and checks its md5)
    require_files(files, "tinyimagenet", f"extract {TINY_IMAGENET_URL} into {root}")
