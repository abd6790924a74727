"""One member's epoch on 1 vs 2 Ray Train workers (DDP over gloo, one thread each).

The config's first member trained for `training.epochs` on a fresh local Ray of this machine's
cores, once with `resources.workers_per_member: 1` and once with 2 (each worker one CPU, one
torch thread, its half of the training shards). An epoch's wall time is the time between two
epoch reports of rank 0 (the first epoch, with the workers' start, is left out); it includes
rank 0's validation and checkpoint, as every epoch of a job does. Prints each epoch's seconds
and the scaling efficiency T1 / (2 T2).

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


def epoch_seconds(job, workers: int, tmp: str) -> list[float]:
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
    ends = [event["time"] for event in events if event["kind"] == "epoch"]
    return [later - earlier for earlier, later in zip(ends, ends[1:], strict=False)]


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
    for workers, epochs in seconds.items():
        shown = ", ".join(f"{s:.1f}" for s in epochs)
        print(f"{workers} worker(s): epochs 2-{len(epochs) + 1} took {shown} s "
              f"(mean {sum(epochs) / len(epochs):.1f} s)")  # fmt: skip
    one, two = (sum(seconds[w]) / len(seconds[w]) for w in (1, 2))
    efficiency = one / (2 * two)
    print(f"speed-up {one / two:.2f}x on 2 workers; scaling efficiency {100 * efficiency:.0f}%")


if __name__ == "__main__":
    main()
