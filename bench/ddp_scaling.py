"""One member's epoch on 1 vs 2 Ray Train workers (DDP over gloo, one thread each).

The config's first member trained for `training.epochs` on a fresh local Ray of this machine's
cores, once with `resources.workers_per_member: 1` and once with 2 (each worker one CPU, one
torch thread, its half of the training shards). Two times per epoch of rank 0 (the first
epoch, with the workers' start, is left out): its updates alone (`epoch_start` to `epoch_end`,
what DDP splits), and the whole epoch, the time between two epoch reports, which adds rank 0's
validation and checkpoint (one rank's work, as in every job). Prints both and the scaling
efficiency T1 / (2 T2) of each.

    python bench/ddp_scaling.py [--config jobs/configs/quickstart.yaml] [--set training.epochs=4]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import ray

from orchestrator.config import load_config, parse_overrides
from orchestrator.runtime.progress import BoardReader, board_here
from orchestrator.runtime.shards import materialize
from orchestrator.training.plan import psat_members
from orchestrator.training.trainer import train_on_ray


def epoch_seconds(job, workers: int, tmp: str) -> dict[str, list[float]]:
    resources = job.resources.model_copy(update={
        "workers_per_member": workers, "cpus_per_worker": 1, "torch_threads": 1,
        "ddp_backend": "gloo",
    })  # fmt: skip
    job = job.model_copy(update={"resources": resources, "name": f"ddp{workers}"})
    plan = psat_members(job)[0]
    manifest = materialize(job, f"{tmp}/data-{workers}", workers)
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level=logging.WARNING)
    try:
        board = board_here()
        train_on_ray(job, plan, manifest, board)
        events = BoardReader(board)()
    finally:
        ray.shutdown()
    epochs = [e for e in events if e["kind"] == "epoch" and "trade_off" in e]  # rank 0's
    ends = [event["time"] for event in epochs]
    return {
        "updates": [e["epoch_end"] - e["epoch_start"] for e in epochs[1:]],
        "whole epoch": [later - earlier for earlier, later in zip(ends, ends[1:], strict=False)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = load_config(args.config, parse_overrides(args.set) | {"storage": {"path": tmp}})
        print(f"{args.config} {' '.join(args.set)}: member {job.training.members[0]}, "
              f"{job.data.train_size or 'all'} training images, batch {job.training.batch_size}, "
              f"{job.training.epochs} epochs, {os.cpu_count()} cores", flush=True)  # fmt: skip
        seconds = {workers: epoch_seconds(job, workers, tmp) for workers in (1, 2)}
    for part in ("updates", "whole epoch"):
        for workers, times in seconds.items():
            epochs = times[part]
            shown = ", ".join(f"{s:.1f}" for s in epochs)
            print(f"{part}, {workers} worker(s): epochs 2-{len(epochs) + 1} took {shown} s "
                  f"(mean {sum(epochs) / len(epochs):.1f} s)")  # fmt: skip
        one, two = (sum(seconds[w][part]) / len(seconds[w][part]) for w in (1, 2))
        print(f"{part}: speed-up {one / two:.2f}x on 2 workers; scaling efficiency "
              f"{100 * one / (2 * two):.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
