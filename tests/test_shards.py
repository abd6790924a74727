import pyarrow.parquet as pq
import torch

from orchestrator.config import parse_config
from orchestrator.config.locations import join
from orchestrator.runtime.shards import materialize, read_arrays, write_arrays
from psat_core.data import ImageArrays


def test_parquet_round_trip_is_exact(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 4, 2, 2, 9])
    write_arrays(ImageArrays(images, labels), str(tmp_path / "a.parquet"))
    back = read_arrays(str(tmp_path / "a.parquet"))
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels)
    assert pq.read_schema(tmp_path / "a.parquet").field("image").type.byte_width == 48


def test_materialize_writes_disjoint_shards_once(tmp_path):
    job = parse_config(
        {"name": "t", "data": {"dataset": "digits", "val_size": 100, "eval_size": 50}}
    )
    uri = join(str(tmp_path), "data")
    manifest = materialize(job, uri, num_shards=2)
    assert manifest["sizes"] == {"train": 1437 - 100, "val": 100, "eval": 50}
    shards = [read_arrays(u) for u in manifest["train"]]
    assert [len(s) for s in shards] == manifest["shard_sizes"]
    val = read_arrays(manifest["val"])
    rows = {tuple(img.flatten().tolist()) for s in shards for img in s.images}
    assert not any(tuple(img.flatten().tolist()) in rows for img in val.images[:20])
    mtime = (tmp_path / "data" / "val.parquet").stat().st_mtime_ns
    assert materialize(job, uri, num_shards=2) == manifest  # reused, not rewritten
    assert (tmp_path / "data" / "val.parquet").stat().st_mtime_ns == mtime
