"""Wall time of the Ray orchestrator against a bare single-process torch loop, same work.

Both train the same members (same config, data shards, epochs, per-epoch validation) with the
same psat_core functions: once through `train_members` (local Ray started here, Ray Train
workers, checkpoints, MLflow), once in this process, member after member, with every core's
torch threads. Prints both wall times, their ratio (target <= 1.15 at quickstart size), and where
the orchestrator's extra time goes.

    python bench/orchestrator_overhead.py [--config jobs/configs/quickstart.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
import torch

from orchestrator.config import load_config, parse_overrides
from orchestrator.members import member_spec, psat_members
from orchestrator.shards import materialize, read_arrays
from orchestrator.training import train_members
from psat_core.attacks import make_attacks
from psat_core.metrics import evaluate_robustness
from psat_core.train import make_optimizer, make_scheduler, train_epoch, training_inputs


def bare(job, manifest) -> float:
    """The same members, epochs and validation as plain torch in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    train = read_arrays(manifest["train"][0])
    val = read_arrays(manifest["val"])
    cfg = job.training
    steps = -(-len(train) // cfg.batch_size)
    eval_attacks = make_attacks(job.attack_configs("eval"))
    start = time.perf_counter()
    for plan in psat_members(job):
        torch.manual_seed(cfg.seed)
        model = member_spec(job, plan).build()
        optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * steps)
        train_attacks = job.attack_configs("train")
        inputs = training_inputs(plan.method, {n: train_attacks[n] for n in plan.norms})
        for epoch in range(cfg.epochs):
            train_epoch(
                model, train, optimizer, scheduler, inputs,
                batch_size=cfg.batch_size, steps=steps, seed=cfg.seed + epoch,
                augment=job.dataset.augment, amp=cfg.amp,
            )  # fmt: skip
            evaluate_robustness(model, val.to_float(), val.labels, eval_attacks)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = parse_overrides(args.set) | {
            "name": "overhead-bench",
            "storage": {"path": f"{tmp}/runs"},
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench"},
        }
        job = load_config(args.config, overrides)
        members = len(job.training.members)

        start = time.perf_counter()
        events: list[tuple[float, str]] = []
        train_members(job, echo=lambda line: events.append((time.perf_counter(), line)))
        ray_wall = time.perf_counter() - start
        manifest = materialize(job, f"{tmp}/runs/overhead-bench/data", 1)
        ray.shutdown()

        starts = [t - start for t, line in events if " started " in line]
        epochs = [t - start for t, line in events if " epoch " in line]
        bare_wall = bare(job, manifest)

    print(f"config {args.config}: {members} members x {job.training.epochs} epochs, "
          f"{manifest['sizes']['train']} train / {manifest['sizes']['val']} val images, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"ray orchestrator wall  {ray_wall:8.1f} s")
    print(f"bare torch loop wall   {bare_wall:8.1f} s  (members one after another)")
    print(f"ratio ray / bare       {ray_wall / bare_wall:8.3f}  (target <= 1.15)")
    print("where the orchestrator's time goes (seconds since launch):")
    print(f"  all members' train loops running  {max(starts):7.1f}  (ray.init, data shards, MLflow "
          "runs, TorchTrainer controller and worker start-up)")  # fmt: skip
    print(f"  first epoch reported              {min(epochs):7.1f}")
    print(f"  last epoch reported               {max(epochs):7.1f}")
    print(f"  train_members returned            {ray_wall:7.1f}  (final report, checkpoints, "
          "MLflow, worker teardown)")  # fmt: skip


if __name__ == "__main__":
    main()
