"""The specialist table (the premise of the paper's Table 3): is each AT specialist the most
robust model on its own norm, and weak on another?

Trains AT_ℓ∞, AT_ℓ2 and AT_ℓ1 (plain ResNets, the config's budget) in this process with
`orchestrator.training.fit.train_in_process` (the workers' `Fit`, Ray-free), evaluates each on the
eval split under `evaluation.suite` at the `attacks.eval` radii, and prints the table with the
balls' ratios (ε∞·√d/ε2 and ε∞·d/ε1; CIFAR-10's are 3.5 and 8).

    python bench/specialists.py [--config jobs/configs/reproduce_digits.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from orchestrator.config import load_config, parse_overrides
from orchestrator.evaluation.report import table_lines
from orchestrator.evaluation.tasks import final_attacks
from orchestrator.runtime.shards import materialize, read_arrays
from orchestrator.training.fit import train_in_process
from orchestrator.training.plan import ModelPlan
from psat_core.metrics import evaluate_per_sample, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/reproduce_digits.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = parse_overrides(args.set) | {"name": "specialists"}
        job = load_config(args.config, overrides | {"storage": {"path": tmp}})
        manifest = materialize(job, f"{tmp}/data", 1)
        train, val = read_arrays(manifest["train"][0]), read_arrays(manifest["val"])
        test = read_arrays(manifest["eval"])
        eps = {norm: cfg.eps for norm, cfg in job.attack_configs("eval").items()}
        d = math.prod(test.images.shape[1:])
        ratio_2, ratio_1 = eps["linf"] * math.sqrt(d) / eps["l2"], eps["linf"] * d / eps["l1"]
        print(f"config {args.config}: {job.model.arch}, {job.training.epochs} epochs, "
              f"{len(train)} train / {len(test)} eval, suite {job.evaluation.suite}")  # fmt: skip
        print(f"radii {eps}; eps_inf*sqrt(d)/eps_2 = {ratio_2:.2f}, eps_inf*d/eps_1 = "
              f"{ratio_1:.2f} (CIFAR-10: 3.48, 8.03)")  # fmt: skip
        rows = {}
        for norm in job.training.members:
            plan = ModelPlan(f"at_{norm}", "at", (norm,), None)
            started = time.perf_counter()
            model = train_in_process(job, plan, train, val).net
            trained = time.perf_counter() - started
            attacks = final_attacks(job, ensemble=False, seed=job.data.seed)
            per = evaluate_per_sample(
                model.eval(), test.to_float(), test.labels, attacks, seed=job.data.seed
            )
            rows[f"AT_{norm}"] = summarize(per)
            print(f"AT_{norm}: trained in {trained:.0f} s, evaluated in "
                  f"{time.perf_counter() - started - trained:.0f} s")  # fmt: skip
    for line in table_lines(rows):
        print(line)
    for norm in job.training.members:
        best = max(rows, key=lambda name: rows[name][norm])
        print(f"{norm}: most robust {best} ({100 * rows[best][norm]:.1f}%); AT_{norm} weakest "
              f"on {min(job.training.members, key=lambda n: rows[f'AT_{norm}'][n])}")  # fmt: skip


if __name__ == "__main__":
    main()
