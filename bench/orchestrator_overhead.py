"""Wall time of the Ray orchestrator against a bare single-process torch loop, same work.

Both train the same members (same config, data shards, epochs, per-epoch validation) with the
same `orchestrator.training.fit.Fit`: once through `train_members` (local Ray started here, Ray
Train workers, checkpoints, MLflow), once in this process (`train_in_process`), member after
member, with every core's torch threads. Prints both wall times, their ratio (target <= 1.15
at quickstart size), and where the orchestrator's extra time goes.

    python bench/orchestrator_overhead.py [--config jobs/configs/quickstart.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from orchestrator.config import load_config, parse_overrides
from orchestrator.runtime.shards import materialize, read_arrays
from orchestrator.train_members import train_members
from orchestrator.training.fit import train_in_process
from orchestrator.training.plan import psat_members

RAY_SYSTEM = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py")


class CpuAccount:
    """CPU seconds of every process on this machine while it runs, by process title.

    Ray retitles its workers (`ray::RayTrainWorker`, ...), so each sample re-reads the title;
    a process that exits keeps its last sample (at most `every` seconds short) and title.
    """

    def __init__(self, every: float = 2.0):
        self.every = every
        self.tick = os.sysconf("SC_CLK_TCK")
        self.base = self._sample()
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[str, float]]:
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
            out[int(entry.name)] = (title, (int(fields[11]) + int(fields[12])) / self.tick)
        return out

    def _record(self) -> None:
        for pid, (title, cpu) in self._sample().items():  # an exiting process has no title
            self.last[pid] = (title or self.last.get(pid, ("", 0.0))[0], cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._record()

    def __enter__(self) -> CpuAccount:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    def by_kind(self) -> dict[str, tuple[float, int]]:
        """{kind: (CPU seconds, processes)}, costliest first."""
        kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for pid, (title, cpu) in self.last.items():
            used = cpu - self.base.get(pid, ("", 0.0))[1]
            if used >= 0.05:
                kind = kinds[_kind(pid, title)]
                kind[0] += used
                kind[1] += 1
        return dict(sorted(((k, tuple(v)) for k, v in kinds.items()), key=lambda kv: -kv[1][0]))


def _kind(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "driver (this process: ray.init, shards, MLflow, progress)"
    if "ray::RayTrainWorker" in title:
        return "Ray Train workers (the training itself)"
    if title.startswith("ray::"):  # an actor: Train's controller, cleaner, ...; our board
        return title.split()[0].split(".")[0]
    if any(name in title for name in RAY_SYSTEM):
        return "Ray system (gcs, raylet, dashboard and its modules, log monitor)"
    return f"other: {Path(title.split()[0]).name if title else '(exited before its first sample)'}"


def bare(job, manifest) -> float:
    """The same members, epochs and validation as `train_in_process`, one after another."""
    torch.set_num_threads(os.cpu_count() or 1)
    train, val = read_arrays(manifest["train"][0]), read_arrays(manifest["val"])
    start = time.perf_counter()
    for plan in psat_members(job):
        train_in_process(job, plan, train, val)
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

        events: list[tuple[float, str]] = []
        with CpuAccount() as account:
            start = time.perf_counter()
            train_members(job, echo=lambda line: events.append((time.perf_counter(), line)))
            ray_wall = time.perf_counter() - start
        manifest = materialize(job, f"{tmp}/runs/overhead-bench/data", 1)
        ray.shutdown()

        starts = [t - start for t, line in events if " started " in line]
        epochs = [t - start for t, line in events if " epoch " in line]
        before = resource.getrusage(resource.RUSAGE_SELF)
        bare_wall = bare(job, manifest)
        after = resource.getrusage(resource.RUSAGE_SELF)
        bare_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

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
    cores = os.cpu_count() or 1
    print(f"CPU seconds during the Ray run ({cores} cores x {ray_wall:.1f} s = "
          f"{cores * ray_wall:.1f} core-s):")  # fmt: skip
    kinds = account.by_kind()
    for kind, (cpu, count) in kinds.items():
        print(f"  {cpu:7.1f}  x{count:<3d} {kind}")
    busy = sum(cpu for cpu, _ in kinds.values())
    idle = cores * ray_wall - busy
    print(f"  {idle:7.1f}        idle (cores waiting: start-up, the last member alone)")
    print(f"bare loop CPU seconds  {bare_cpu:8.1f}  ({cores} torch threads x {bare_wall:.1f} s)")


if __name__ == "__main__":
    main()
