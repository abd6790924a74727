"""psat_core.data: loaders read tiny files written here in each dataset's real on-disk format."""

import inspect
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch
from helpers import RunsCommand, write_cifar10
from PIL import Image
from sklearn.datasets import load_digits

from psat_core.data import ImageArrays, load_dataset, random_crop_flip
from psat_core.dataset_files import DatasetNotFoundError
from psat_core.settings import (
    DATASETS,
    NORMS,
    PHASES,
    AttackConfig,
    attack_defaults,
    dataset_info,
)


def _assert_image_arrays(arrays, n, channels, size):
    assert arrays.images.shape == (n, channels, size, size)
    assert arrays.images.dtype == torch.uint8
    assert arrays.labels.shape == (n,)
    assert arrays.labels.dtype == torch.int64
    x = arrays.to_float()
    assert x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


# --- registry -----------------------------------------------------------------------------------


def test_registry_covers_the_papers_datasets_and_digits():
    assert set(DATASETS) == {"cifar10", "svhn", "tinyimagenet", "digits"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.in_channels
    assert dataset_info("tinyimagenet").num_classes == 200
    assert dataset_info("tinyimagenet").image_size == 64
    assert [n for n, info in DATASETS.items() if info.augment] == ["cifar10", "tinyimagenet"]


@pytest.mark.parametrize("name", DATASETS)
def test_every_registered_dataset_is_one_complete_entry(name):
    info = DATASETS[name]
    assert dataset_info(name) is info and info.name == name
    assert info.num_classes >= 2 and info.image_size >= 1
    assert info.train_images >= 1 and info.test_images >= 1
    assert len(info.mean) == len(info.std) == info.in_channels
    assert all(0 <= m <= 1 for m in info.mean) and all(0 < s <= 1 for s in info.std)
    assert set(info.attacks) == set(PHASES)
    for phase in PHASES:
        configs = attack_defaults(name, phase)
        assert list(configs) == list(NORMS)
        assert all(isinstance(c, AttackConfig) and c.norm == n for n, c in configs.items())
    module, colon, function = info.loader.partition(":")
    assert colon and module.startswith("psat_core.") and function.isidentifier()
    load = info.load_function()
    assert callable(load)
    assert list(inspect.signature(load).parameters) == ["root", "split", "download"]


def test_settings_import_without_torch():
    code = "import psat_core.settings, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_dataset_names_it_and_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="'mnist'.*cifar10.*digits"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="'mnist'"):
        load_dataset("mnist", "train", tmp_path)


def test_unknown_split_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="'val'"):
        load_dataset("digits", "val", tmp_path)


# --- CIFAR-10 -----------------------------------------------------------------------------------


def test_cifar10_train_and_test_load_through_torchvision(tmp_path, caplog):
    written = write_cifar10(tmp_path)
    with caplog.at_level(logging.WARNING, logger="psat_core.data"):
        train = load_dataset("cifar10", "train", tmp_path)
    _assert_image_arrays(train, 10, 3, 32)
    batches = [written[f"data_batch_{i}"] for i in range(1, 6)]
    expected = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == [label for _, labels in batches for label in labels]
    # Files other than the official release are loaded, but never silently.
    assert "differ from the official release" in caplog.text
    assert "data_batch_1" in caplog.text

    test = load_dataset("cifar10", "test", tmp_path)
    _assert_image_arrays(test, 3, 3, 32)
    data, labels = written["test_batch"]
    assert torch.equal(test.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == labels


def test_cifar10_missing_batch_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as error:
        load_dataset("cifar10", "test", tmp_path)
    assert "data_batch_1" not in str(error.value)


# --- SVHN ---------------------------------------------------------------------------------------


def test_svhn_loads_mat_layout_and_maps_label_10_to_0(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # H x W x C x N
        y = np.array([[10], [1], [9], [10], [3]][:n], dtype=np.uint8)  # N x 1, 10 = digit 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays = load_dataset("svhn", split, tmp_path)
        _assert_image_arrays(arrays, n, 3, 32)
        assert torch.equal(arrays.images, torch.from_numpy(x.transpose(3, 2, 0, 1)))
        assert arrays.labels.tolist() == [0, 1, 9, 0, 3][:n]


# --- TinyImageNet -------------------------------------------------------------------------------

_COLORS = {"n02000000": (200, 30, 30), "n01000000": (30, 30, 200)}


def _write_tinyimagenet(root):
    """tiny-imagenet-200/ with wnids.txt in file (unsorted) order, train and labelled val."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir()
    (folder / "wnids.txt").write_text("n02000000\nn01000000\n")
    for wnid, color in _COLORS.items():
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), color).save(images / f"{wnid}_{i}.JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val = folder / "val" / "images"
    val.mkdir(parents=True)
    Image.new("RGB", (64, 64), _COLORS["n02000000"]).save(val / "val_0.JPEG")
    Image.new("RGB", (64, 64), _COLORS["n01000000"]).save(val / "val_1.JPEG")
    Image.new("L", (64, 64), 128).save(val / "val_2.JPEG")  # grayscale, as some real ones are
    (folder / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02000000\t0\t0\t63\t63\n"
        "val_1.JPEG\tn01000000\t1\t2\t60\t61\n"
        "val_2.JPEG\tn02000000\t5\t5\t50\t50\n"
    )


def test_tinyimagenet_labels_index_sorted_wnids(tmp_path):
    _write_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", "train", tmp_path)
    _assert_image_arrays(train, 4, 3, 64)
    # sorted wnids: n01000000 -> 0 (blue), n02000000 -> 1 (red)
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1]
    means = train.images.float().mean(dim=(2, 3))
    for label, mean in zip(train.labels.tolist(), means, strict=True):
        color = _COLORS["n01000000" if label == 0 else "n02000000"]
        assert torch.allclose(mean, torch.tensor(color, dtype=torch.float32), atol=3)

    test = load_dataset("tinyimagenet", "test", tmp_path)
    _assert_image_arrays(test, 3, 3, 64)
    assert test.labels.tolist() == [1, 0, 1]
    gray = test.images[2].float().mean(dim=(1, 2))
    assert torch.allclose(gray, torch.full((3,), 128.0), atol=3)


def test_tinyimagenet_download_is_skipped_when_present(tmp_path):
    # No network here: download=True must not fetch what is already extracted.
    _write_tinyimagenet(tmp_path)
    assert len(load_dataset("tinyimagenet", "test", tmp_path, download=True)) == 3


def test_tinyimagenet_train_folders_must_match_wnids(tmp_path):
    _write_tinyimagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("n01000000\nn03000000\n")
    with pytest.raises(ValueError, match="do not match"):
        load_dataset("tinyimagenet", "train", tmp_path)


# --- missing data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "looked_at"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("svhn", "train_32x32.mat"),
        ("tinyimagenet", "tiny-imagenet-200"),
    ],
)
def test_missing_dataset_is_one_clear_error(tmp_path, name, looked_at):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, "train", tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / looked_at) in message
    assert "download=True" in message and "--download" in message
    assert "corrupted" not in message  # torchvision's own message is replaced
    assert isinstance(error.value, FileNotFoundError)


# --- digits -------------------------------------------------------------------------------------


def test_digits_load_offline_with_disjoint_stratified_splits(tmp_path):
    info = dataset_info("digits")
    train = load_dataset("digits", "train", tmp_path / "unused")
    test = load_dataset("digits", "test", tmp_path / "unused")
    _assert_image_arrays(train, 1437, 1, 8)
    _assert_image_arrays(test, 360, 1, 8)
    assert train.images.max() == 255
    for split in (train, test):
        assert set(split.labels.tolist()) == set(range(info.num_classes))

    # Together the splits are exactly the 1797 images, each once (a partition).
    def rows(images, labels):
        flat = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1)
        return flat[np.lexsort(flat.T[::-1])]

    digits = load_digits()
    full = rows(np.rint(digits.images * 255 / 16).astype(np.int64), digits.target)
    both = rows(
        torch.cat([train.images, test.images]).numpy().astype(np.int64),
        torch.cat([train.labels, test.labels]).numpy(),
    )
    assert np.array_equal(full, both)

    assert torch.equal(load_dataset("digits", "train", tmp_path).images, train.images)
    x = train.to_float()
    assert abs(x.mean().item() - info.mean[0]) < 1e-3
    assert abs(x.std().item() - info.std[0]) < 1e-3


# --- ImageArrays --------------------------------------------------------------------------------


def test_image_arrays_validates_dtypes_and_shapes():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageArrays(images.float(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ImageArrays(images, torch.zeros(2, dtype=torch.int64))


def test_subset_is_seeded_and_without_repeats():
    arrays = ImageArrays(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
        torch.arange(10),
    )
    small = arrays.subset(6, seed=3)
    assert len(small) == 6
    assert len(set(small.labels.tolist())) == 6
    assert torch.equal(small.images[:, 0, 0, 0].long(), small.labels)  # pairs stay together
    assert torch.equal(arrays.subset(6, seed=3).labels, small.labels)
    assert not torch.equal(arrays.subset(6, seed=4).labels, small.labels)
    assert len(arrays.subset(10)) == 10
    with pytest.raises(ValueError, match="11"):
        arrays.subset(11)


# --- augmentation -------------------------------------------------------------------------------


def _candidates(image, padding):
    """Every crop of the zero-padded image, flipped or not."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    h, w = image.shape[1:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield crop
            yield crop.flip(-1)


def test_random_crop_flip_is_a_padded_crop_and_flip_per_sample():
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    for image, augmented in zip(x, out, strict=True):
        assert any(torch.equal(augmented, c) for c in _candidates(image, 2))
    changed = [not torch.equal(a, b) for a, b in zip(x, out, strict=True)]
    assert sum(changed) >= 8
    again = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_random_crop_flip_reflect_and_no_padding():
    x = torch.rand(32, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    reflected = random_crop_flip(x, padding=2, padding_mode="reflect")
    assert reflected.shape == x.shape
    assert set(reflected.unique().tolist()) <= set(x.unique().tolist())  # no zeros brought in
    flipped_only = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(2))
    same = [torch.equal(a, b) for a, b in zip(x, flipped_only, strict=True)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(x, flipped_only, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)
    with pytest.raises(ValueError, match="padding_mode"):
        random_crop_flip(x, padding_mode="circular")
    with pytest.raises(ValueError, match="float"):
        random_crop_flip(x[0])


@pytest.mark.parametrize("kind", ["runs_code", "corrupt"])
def test_cifar10_files_are_data_never_code(tmp_path, kind):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    marker = tmp_path / "pwned"
    if kind == "runs_code":
        batch.write_bytes(pickle.dumps({"data": RunsCommand(f"touch {marker}"), "labels": [0]}))
    else:
        batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR-10 python batch") as error:
        load_dataset("cifar10", "train", tmp_path)
    assert "\n" not in str(error.value)
    if kind == "runs_code":
        assert "refusing global posix.system" in str(error.value)
    assert not marker.exists()  # the command never ran
    assert load_dataset("cifar10", "test", tmp_path).labels.numel() == 3  # other files still load
