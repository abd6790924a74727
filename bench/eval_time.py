"""What the final evaluation costs: each row's time, per attack, against one natural forward pass.

Rows as a report evaluates them (`orchestrator.evaluation`): each member checkpoint alone and
the lowest-entropy ensemble of all of them, through `psat_core.metrics.evaluate_per_sample`
with the suite, radii and budgets of the dataset's `eval` defaults (`--apgd-steps` as the
config's `evaluation.apgd_steps`). Prints, per attack, the points still robust after it and
its seconds; per row, the total against one no-grad forward pass over the same images.

`--transfer` (strong suite): how the ensemble's transfer attack gets the members' examples:
`borrow` (as reports do) from the member rows, which keep theirs and craft the rest
(`psat_core.attacks.adaptive.member_examples`, its seconds counted in the member row); `craft` in
the ensemble row itself; `both` evaluates the ensemble both ways and compares what each found.
The last lines give the ensemble row's time as a multiple of the mean member row's.

    python bench/eval_time.py --members linf=DIR l2=DIR l1=DIR [--images 100]
                              [--apgd-steps 100] [--suite strong] [--transfer borrow]
                              [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from psat_core.attacks.adaptive import member_examples
from psat_core.attacks.suites import SUITES, attack_suite, transfer_crafters
from psat_core.checkpoint import load_member, read_spec
from psat_core.data import load_dataset
from psat_core.ensemble import PSATEnsemble
from psat_core.metrics import evaluate_per_sample, example_scores, summarize
from psat_core.settings import attack_defaults


def forward_seconds(model, x) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        model(x)
    return time.perf_counter() - start


def evaluate(label, model, x, y, attacks, seed, keep=()):
    """One row, printing each attack's points still robust and seconds; returns the result
    and the row's seconds."""
    print(f"\n## {label}\n| attack | still robust | seconds |\n| --- | --- | --- |")
    last = [time.perf_counter()]

    def progress(name: str, robust: int, total: int, left: float, last=last) -> None:
        now = time.perf_counter()
        print(f"| {name} | {robust}/{total} | {now - last[0]:.1f} |", flush=True)
        last[0] = now

    start = time.perf_counter()
    result = evaluate_per_sample(model, x, y, attacks, seed=seed, progress=progress, keep=keep)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="+", required=True, help="NORM=DIR ...")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--apgd-steps", type=int, default=100)
    parser.add_argument("--suite", choices=SUITES, default="strong")
    parser.add_argument("--transfer", choices=("borrow", "craft", "both"), default="borrow")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dirs = dict(item.split("=", 1) for item in args.members)
    spec = read_spec(next(iter(dirs.values())))
    data = load_dataset(spec.dataset, "test", "~/.psat/data").subset(args.images, seed=args.seed)
    x, y = data.to_float(), data.labels
    members = {f"H_{n}": load_member(d).eval() for n, d in dirs.items()}
    ensemble = PSATEnsemble(list(members.values()), names=list(dirs)).eval()
    configs = attack_defaults(spec.dataset, "eval")
    suite = {"apgd_steps": args.apgd_steps, "seed": args.seed}
    print(
        f"{spec.dataset}: {args.images} test images, suite {args.suite}, {args.apgd_steps} APGD "
        f"steps, PGD {', '.join(f'{n} {c.steps}x{c.restarts}' for n, c in configs.items())}, "
        f"{torch.get_num_threads()} thread(s), transfer {args.transfer}"
    )
    lend = args.suite == "strong" and args.transfer != "craft"
    lent, member_seconds, lending_seconds = [], [], []
    for label, model in members.items():
        attacks = attack_suite(args.suite, configs, ensemble=False, **suite)
        crafters = transfer_crafters(attacks) if lend else {}
        keep = [name for names in crafters.values() for name in names]
        result, seconds = evaluate(label, model, x, y, attacks, args.seed, keep)
        started = time.perf_counter()
        lent.append({n: member_examples(model, x, y, result, c, args.seed)
                     for n, c in crafters.items()})  # fmt: skip
        lending = time.perf_counter() - started
        report(label, result, seconds + lending, x, model, args.images)
        if lend:
            print(f"{label}: of which {lending:.1f} s crafting the examples it lends")
        member_seconds.append(seconds)
        lending_seconds.append(lending)
    borrowed = {n: torch.cat([examples[n] for examples in lent]) for n in configs} if lend else None
    ways = {"both": ("craft", "borrow")}.get(args.transfer, (args.transfer,))
    found = {}
    for way in ways:
        examples = borrowed if way == "borrow" else None
        attacks = attack_suite(
            args.suite, configs, ensemble=True, member_examples=examples, **suite
        )
        label = f"PSAT ({way}ing the transfer's examples)" if args.suite == "strong" else "PSAT"
        result, seconds = evaluate(label, ensemble, x, y, attacks, args.seed)
        report(label, result, seconds, x, ensemble, args.images)
        # a member row's time: with its lending where the ensemble borrows
        mean = (sum(member_seconds) + (way == "borrow") * sum(lending_seconds)) / len(members)
        print(f"{label}: {seconds / mean:.1f}x the mean member row ({mean:.1f} s)")
        found[way] = result
    if len(found) == 2:
        compare_transfers(ensemble, x, y, configs, suite, borrowed, found)


def compare_transfers(ensemble, x, y, configs, suite, borrowed, found) -> None:
    """What the transfer attack found crafting its examples and borrowing them: after the
    suite's other attacks (the rows above), and alone, on every clean-correct point."""
    for norm in configs:
        after = [int(result.found(f"{norm}/transfer").sum()) for result in found.values()]
        print(f"{norm}/transfer after the other attacks found {after[0]} crafting, "
              f"{after[1]} borrowing")  # fmt: skip
    for way, examples in (("craft", None), ("borrow", borrowed)):
        attacks = attack_suite("strong", configs, ensemble=True, member_examples=examples, **suite)
        alone = {name: a for name, a in attacks.items() if name.endswith("/transfer")}
        start = time.perf_counter()
        scores = example_scores(evaluate_per_sample(ensemble, x, y, alone, seed=suite["seed"]))
        counts = ", ".join(f"{norm} {int(scores[norm].sum())}/{len(y)}" for norm in configs)
        seconds = time.perf_counter() - start
        print(f"transfer alone, {way}ing: {seconds:.1f} s, still robust {counts}")


def report(label, result, seconds, x, model, images) -> None:
    row = summarize(result)
    forward = forward_seconds(model, x)
    print(
        f"{label}: {seconds:.1f} s = {seconds / images:.2f} s/image = "
        f"{seconds / forward:.0f}x one natural forward pass ({forward * 1000:.1f} ms); "
        + ", ".join(f"{k} {100 * row[k]:.1f}%" for k in ("clean", "linf", "l2", "l1"))
    )


if __name__ == "__main__":
    main()
