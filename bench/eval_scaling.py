"""Evaluation at the cluster's scale: rows split into chunks, each a Ray task.

(a) The quickstart's evaluation phase (its 5 rows: 3 members, the ensemble under both
    strategies) on this machine's Ray, before (one task per row: `evaluation.chunk_images` =
    the eval split) and after (chunks of `--chunk-images`), each in a fresh Ray: wall time,
    the mean CPU use and the share of time every core is busy (/proc/stat, sampled).
(b) Per-image cost of each row kind (task seconds per image, from (a)'s run of one task per row:
    batches as large as the row allows, as on a GPU cluster's 256-image chunks), and from
    them a *prediction* of `cifar10.yaml`'s evaluation (aggregation: 3 member + 2 ensemble
    rows; reproduction: its table rows) on 1, 4 and 8 GPUs. The GPU per-image cost of a member
    row is an input (`--gpu-member-ms`; default: the issue's H200 measurement, 75 and 113 ms),
    the ensemble's is that times the ensemble/member ratio measured here.

    python bench/eval_scaling.py [--config jobs/configs/quickstart.yaml]
        [--members linf=DIR l2=DIR l1=DIR]   # default: train the config's members here
        [--chunk-images 25 10] [--set evaluation.suite=paper ...]
    python bench/eval_scaling.py --reproduction --config jobs/configs/reproduce_digits.yaml
        --set evaluation.suite=paper --set data.eval_size=60 --set training.epochs=1 ...
        # (a) for the reproduction's rows: every model of its first seed trained here (the
        # evaluation's cost hardly depends on how well), then its unique table rows
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
import torch

from orchestrator.config import load_config, parse_overrides
from orchestrator.evaluation.reproduction import unique_rows
from orchestrator.evaluation.rows import aggregation_rows
from orchestrator.evaluation.tasks import evaluate_rows
from orchestrator.reproduce import model_plans, table_rows
from orchestrator.runtime.shards import materialize, read_arrays
from orchestrator.training.fit import train_in_process
from orchestrator.training.plan import psat_members
from psat_core.checkpoint import save_member
from psat_core.ensemble import STRATEGIES


class CpuSampler:
    """Per-core busy fractions from /proc/stat every `every` seconds, in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> list[tuple[int, int]]:
        cores = []
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3].isdigit():
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]  # idle + iowait
                cores.append((sum(values) - idle, sum(values)))
        return cores

    def _run(self) -> None:
        before = self._read()
        while not self.stop.wait(self.every):
            after = self._read()
            pairs = zip(before, after, strict=True)
            self.samples.append([(b1 - b0) / max(t1 - t0, 1) for (b0, t0), (b1, t1) in pairs])
            before = after

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def mean_busy(self) -> float:
        return sum(sum(s) / len(s) for s in self.samples) / max(len(self.samples), 1)

    def all_busy(self, threshold: float = 0.9) -> float:
        return sum(min(s) >= threshold for s in self.samples) / max(len(self.samples), 1)


def train_members(job, root: Path, plans=None) -> dict[str, str]:
    """The config's PSAT members (or `plans`), trained here (one process each), as checkpoint
    folders."""
    manifest = materialize(job, str(root / "data"), 1)
    plans = plans or psat_members(job)
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        states = {p.name: pool.submit(_train, job.model_dump(), manifest, p) for p in plans}
        return {p.name: _saved(job, p, states[p.name].result(), root) for p in plans}


def _train(job_dict, manifest, plan):
    from orchestrator.config import JobConfig

    torch.set_num_threads(1)
    job = JobConfig.model_validate(job_dict)
    train, val = read_arrays(manifest["train"][0]), read_arrays(manifest["val"])
    return train_in_process(job, plan, train, val).state(job.training.epochs - 1)


def _saved(job, plan, state, root: Path) -> str:
    folder = root / "members" / plan.name
    save_member(folder, plan.spec(job), state)
    return str(folder)


def evaluate_phase(
    job, members: dict[str, str], eval_uri: str, rows
) -> tuple[dict, float, CpuSampler]:
    """`rows` on a fresh local Ray of this machine's cores."""
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level=logging.WARNING)
    try:
        with CpuSampler() as cpu:
            started = time.perf_counter()
            results = evaluate_rows(job, rows, members, eval_uri, echo=lambda line: None)
            wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    return results, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--members", nargs="*", default=[], help="name=DIR ...")
    parser.add_argument("--chunk-images", type=int, nargs="+", default=[25])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--gpu-member-ms", type=float, nargs="+", default=[75.0, 113.0])
    parser.add_argument("--reproduction", action="store_true", help="the reproduction's rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        job = load_config(args.config, parse_overrides(args.set) | {"storage": {"path": tmp}})
        if args.reproduction:
            plans = [plan for plan in model_plans(job) if plan.seed == 0]
            started = time.perf_counter()
            members = train_members(job, root, plans)
            print(f"trained {len(plans)} models in {time.perf_counter() - started:.0f} s")
            rows = unique_rows(table_rows(job))
        else:
            members = dict(m.split("=", 1) for m in args.members) or train_members(job, root)
            rows = aggregation_rows(members, STRATEGIES)
        eval_uri = materialize(job, str(root / "data"), 1)["eval"]
        images = len(read_arrays(eval_uri))
        print(f"{args.config}: {len(members)} members, {images} eval images, suite "
              f"{job.evaluation.suite}, {os.cpu_count()} cores", flush=True)  # fmt: skip
        runs = {}
        chunks = {"before": images} | {f"after ({c})": c for c in args.chunk_images}
        for label, chunk in chunks.items():
            evaluation = job.evaluation.model_copy(update={"chunk_images": chunk})
            chunked = job.model_copy(update={"evaluation": evaluation})
            runs[label] = evaluate_phase(chunked, members, eval_uri, rows)
        kinds = (
            f"{sum(r.strategy is None for r in rows)} single-model, "
            + f"{sum(r.strategy is not None for r in rows)} ensemble"
        )
        print(f"\n(a) the evaluation phase: {len(rows)} rows ({kinds})")
        print("| run | chunks per row | wall | task seconds, summed | mean CPU busy | "
              "time every core busy | PSAT trade-off |")  # fmt: skip
        psat = next(r.key for r in rows if r.strategy == "lowest_entropy")
        print("|---|---|---|---|---|---|---|")
        for label, (results, wall, cpu) in runs.items():
            chunk = chunks[label]
            cost = sum(r.seconds for r in results.values())
            print(f"| {label} | {math.ceil(images / chunk)} | {wall:.0f} s | {cost:.0f} s | "
                  f"{100 * cpu.mean_busy():.0f}% | {100 * cpu.all_busy():.0f}% | "
                  f"{100 * results[psat].row['trade_off']:.2f}% |")  # fmt: skip
        results = runs["before"][0]
        single = {r.key for r in rows if r.strategy is None}
        member = [r.seconds / r.samples for k, r in results.items() if k in single]
        ensemble = [r.seconds / r.samples for k, r in results.items() if k not in single]
        per_member, per_ensemble = sum(member) / len(member), sum(ensemble) / len(ensemble)
        ratio = per_ensemble / per_member
        print("\n(b) task seconds per image, this machine (1 thread per task)")
        print(f"member row {per_member:.2f} s, ensemble row {per_ensemble:.2f} s "
              f"({ratio:.1f}x a member row)")  # fmt: skip
        predict(ratio, args.gpu_member_ms)


def predict(ratio: float, member_ms: list[float]) -> None:
    """PREDICTION of cifar10.yaml's evaluation wall time: chunks of 256 images spread over G
    GPUs, each chunk's cost its images times its row's per-image cost."""
    cifar = load_config("jobs/configs/cifar10.yaml")
    images, chunk = cifar.data.eval_size or 10_000, cifar.evaluation.chunk_images
    rows = {row.key: row for rows in table_rows(cifar).values() for row in rows}
    kinds = {
        "aggregation": (3, 2),
        "reproduction": (sum(r.strategy is None for r in rows.values()),
                         sum(r.strategy is not None for r in rows.values())),
    }  # fmt: skip
    print(f"\n(b) PREDICTION, not a measurement: cifar10.yaml's evaluation ({images} images, "
          f"chunks of {chunk}), a member row at {' / '.join(f'{m:g}' for m in member_ms)} ms "
          f"per image on one GPU, an ensemble row {ratio:.1f}x that")  # fmt: skip
    print("| evaluation | single-model rows | ensemble rows | 1 GPU | 4 GPUs | 8 GPUs |")
    print("|---|---|---|---|---|---|")
    for name, (single, ensembles) in kinds.items():
        cells = []
        for gpus in (1, 4, 8):
            walls = []
            for ms in member_ms:
                per_chunk = [ms / 1000 * chunk] * single * math.ceil(images / chunk)
                per_chunk += [ratio * ms / 1000 * chunk] * ensembles * math.ceil(images / chunk)
                walls.append(schedule(per_chunk, gpus))
            cells.append(" - ".join(f"{w / 3600:.1f} h" for w in walls))
        print(f"| {name} | {single} | {ensembles} | {' | '.join(cells)} |")


def schedule(chunks: list[float], workers: int) -> float:
    """The wall time of `chunks` (seconds each), longest first, each to the least loaded
    worker (ensemble chunks wait for their members', ignored here)."""
    loads = [0.0] * workers
    for cost in sorted(chunks, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


if __name__ == "__main__":
    main()
