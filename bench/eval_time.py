"""What the final evaluation costs: each row's time, per attack, against one natural forward pass.

Rows as a report evaluates them (`orchestrator.evaluation`): each member checkpoint alone and
the lowest-entropy ensemble of all of them, through `psat_core.metrics.evaluate_per_sample`
with the suite, radii and budgets of the dataset's `eval` defaults (`--apgd-steps` as the
config's `evaluation.apgd_steps`). Prints, per attack, the points still robust after it and
its seconds; per row, the total against one no-grad forward pass over the same images.

    python bench/eval_time.py --members linf=DIR l2=DIR l1=DIR [--images 100]
                              [--apgd-steps 100] [--suite strong] [--rows H_linf PSAT]
                              [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from psat_core.attacks import attack_defaults
from psat_core.checkpoint import load_member, read_spec
from psat_core.data import load_dataset
from psat_core.ensemble import PSATEnsemble
from psat_core.metrics import evaluate_per_sample, summarize
from psat_core.protocol import SUITES, attack_suite


def forward_seconds(model, x) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="+", required=True, help="NORM=DIR ...")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--apgd-steps", type=int, default=100)
    parser.add_argument("--suite", choices=SUITES, default="strong")
    parser.add_argument("--rows", nargs="+", default=None, help="e.g. H_linf PSAT (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dirs = dict(item.split("=", 1) for item in args.members)
    spec = read_spec(next(iter(dirs.values())))
    data = load_dataset(spec.dataset, "test", "~/.psat/data").subset(args.images, seed=args.seed)
    x, y = data.to_float(), data.labels
    members = {f"H_{n}": load_member(d).eval() for n, d in dirs.items()}
    models = members | {"PSAT": PSATEnsemble(list(members.values()), names=list(dirs)).eval()}
    models = {k: v for k, v in models.items() if args.rows is None or k in args.rows}
    configs = attack_defaults(spec.dataset, "eval")
    print(
        f"{spec.dataset}: {args.images} test images, suite {args.suite}, {args.apgd_steps} APGD "
        f"steps, PGD {', '.join(f'{n} {c.steps}x{c.restarts}' for n, c in configs.items())}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    for label, model in models.items():
        ensemble = isinstance(model, PSATEnsemble)
        attacks = attack_suite(
            args.suite, configs, ensemble=ensemble, apgd_steps=args.apgd_steps, seed=args.seed
        )
        forward = forward_seconds(model, x)
        print(f"\n## {label}\n| attack | still robust | seconds |\n| --- | --- | --- |")
        last = [time.perf_counter()]

        def progress(name: str, robust: int, total: int, left: float, last=last) -> None:
            now = time.perf_counter()
            print(f"| {name} | {robust}/{total} | {now - last[0]:.1f} |", flush=True)
            last[0] = now

        start = time.perf_counter()
        result = evaluate_per_sample(model, x, y, attacks, seed=args.seed, progress=progress)
        seconds = time.perf_counter() - start
        row = summarize(result)
        print(
            f"{label}: {seconds:.1f} s = {seconds / args.images:.2f} s/image = "
            f"{seconds / forward:.0f}x one natural forward pass ({forward * 1000:.1f} ms); "
            + ", ".join(f"{k} {100 * row[k]:.1f}%" for k in ("clean", "linf", "l2", "l1"))
        )


if __name__ == "__main__":
    main()
