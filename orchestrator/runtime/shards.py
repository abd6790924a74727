"""The dataset, materialized once by the driver as Parquet shards under the run's storage path.

Workers on any node read their own shard through pyarrow's filesystems (local paths, s3://, ...),
so no node needs a copy of the raw dataset. Layout under `<storage>/<run>/data/`:

    train-00000-of-00002.parquet ...   the training split, one shard per worker
    val.parquet                        a held-out slice of the train split (per-epoch metrics)
    eval.parquet                       the test split, or its fixed-seed subset (final evaluation)
    manifest.json                      written last: its presence means the data is complete;
                                       each split's size and sha256 digest (`splits`)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from orchestrator.config import JobConfig
from orchestrator.config.locations import join
from psat_core.data import ImageArrays, load_dataset

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
CONTEXTS = {"train": "training", "val": "validation", "eval": "evaluation"}  # MLflow's names


@dataclass(frozen=True)
class DataSplit:
    """One split as a job used it: what a tracking store records of a dataset."""

    context: str  # training, validation, evaluation
    name: str  # e.g. "digits-eval"
    source: str  # where the shards are (the train split: its folder)
    digest: str  # sha256 of its images and labels, 32 hex digits
    images: int


def digest(arrays: ImageArrays) -> str:
    content = hashlib.sha256(arrays.images.contiguous().numpy().tobytes())
    content.update(arrays.labels.numpy().astype(np.int64).tobytes())
    return content.hexdigest()[:32]


def splits(manifest: dict, dataset: str, data_uri: str) -> list[DataSplit]:
    """The training, validation and evaluation splits of a materialized job."""
    sources = {"train": data_uri, "val": manifest["val"], "eval": manifest["eval"]}
    return [
        DataSplit(context, f"{dataset}-{key}", sources[key], manifest["digests"][key],
                  manifest["sizes"][key])
        for key, context in CONTEXTS.items()
    ]  # fmt: skip


def write_arrays(arrays: ImageArrays, uri: str) -> None:
    images = arrays.images.contiguous().numpy()
    flat = images.reshape(len(images), -1)
    image = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(flat.shape[1]), len(flat), [None, pa.py_buffer(flat.tobytes())]
    )
    table = pa.table({"image": image, "label": pa.array(arrays.labels.numpy(), type=pa.int64())})
    table = table.replace_schema_metadata({"shape": json.dumps(list(images.shape[1:]))})
    fs, path = pafs.FileSystem.from_uri(uri)
    pq.write_table(table, path, filesystem=fs)


def read_arrays(uri: str) -> ImageArrays:
    fs, path = pafs.FileSystem.from_uri(uri)
    table = pq.read_table(path, filesystem=fs)
    shape = json.loads(table.schema.metadata[b"shape"])
    column = table.column("image").combine_chunks()
    size = int(np.prod(shape))
    raw = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    raw = raw[column.offset * size : (column.offset + len(table)) * size]
    images = torch.from_numpy(raw.reshape(len(table), *shape).copy())
    labels = torch.from_numpy(table.column("label").to_numpy().copy())
    return ImageArrays(images, labels)


def read_manifest(data_uri: str) -> dict | None:
    fs, path = pafs.FileSystem.from_uri(join(data_uri, MANIFEST))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def materialize(config: JobConfig, data_uri: str, num_shards: int) -> dict:
    """Write the shards unless a complete, matching set is there already; return the manifest."""
    key = {
        "dataset": config.data.dataset,
        "train_size": config.data.train_size,
        "val_size": config.data.val_size,
        "eval_size": config.data.eval_size,
        "seed": config.data.seed,
        "num_shards": num_shards,
    }
    manifest = read_manifest(data_uri)
    if manifest is not None and manifest["key"] == key and "digests" in manifest:
        return manifest
    train = load_dataset(config.data.dataset, "train", config.data.data_dir, config.data.download)
    test = load_dataset(config.data.dataset, "test", config.data.data_dir, config.data.download)
    # the config checked the official split sizes; files on disk may hold fewer images
    data = config.data
    wanted = {"data.val_size": (data.val_size + 1, len(train), "train"),
              "data.train_size": ((data.train_size or 0) + data.val_size, len(train), "train"),
              "data.eval_size": (data.eval_size or 0, len(test), "test")}  # fmt: skip
    for field, (needed, present, split) in wanted.items():
        if needed > present:
            raise ValueError(
                f"{field} asks for more images than the {present} of {data.dataset}'s "
                f"{split} split in {data.data_dir}; lower it"
            )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(data.seed))
    val_idx, train_idx = order[: data.val_size], order[data.val_size :]
    if data.train_size is not None:
        train_idx = train_idx[: data.train_size]
    if data.eval_size is not None:
        test = test.subset(data.eval_size, seed=data.seed)
    fs, root = pafs.FileSystem.from_uri(data_uri)
    fs.create_dir(root, recursive=True)
    shards, shard_sizes = [], []
    for i, idx in enumerate(train_idx.tensor_split(num_shards)):
        uri = join(data_uri, f"train-{i:05d}-of-{num_shards:05d}.parquet")
        write_arrays(ImageArrays(train.images[idx], train.labels[idx]), uri)
        shards.append(uri)
        shard_sizes.append(len(idx))
    val = ImageArrays(train.images[val_idx], train.labels[val_idx])
    write_arrays(val, join(data_uri, "val.parquet"))
    write_arrays(test, join(data_uri, "eval.parquet"))
    trained = ImageArrays(train.images[train_idx], train.labels[train_idx])
    manifest = {
        "key": key,
        "train": shards,
        "shard_sizes": shard_sizes,
        "val": join(data_uri, "val.parquet"),
        "eval": join(data_uri, "eval.parquet"),
        "sizes": {"train": len(train_idx), "val": len(val_idx), "eval": len(test)},
        "digests": {"train": digest(trained), "val": digest(val), "eval": digest(test)},
    }
    with fs.open_output_stream(join(root, MANIFEST)) as stream:
        stream.write(json.dumps(manifest, indent=2).encode())
    log.debug("materialized %s under %s: %s", config.data.dataset, data_uri, manifest["sizes"])
    return manifest
