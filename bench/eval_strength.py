"""psat's evaluation suites against the attack suites the field trusts, on trained members.

For every member checkpoint (and the lowest-entropy ensemble of all of them), per norm: robust
accuracy under psat's `paper` suite (PGD), psat's `strong` suite (worst over all its attacks)
and each of its attacks, then torchattacks' AutoAttack (standard; ℓ∞, ℓ2) and foolbox's ℓ1
attacks (SparseL1Descent at the top 1% and 10%, L1PGD, EAD, L1 FMN) at the same radius. Also
the time of each suite per image against one natural forward pass.

    python bench/eval_strength.py --members linf=DIR l2=DIR l1=DIR [--images 200] [--seed 0]

DIR: a member checkpoint folder (`member.json` + `state.pt`), e.g. what `psat train` prints.
"""

from __future__ import annotations

import argparse
import time

import foolbox
import torch
import torchattacks

from psat_core.attacks import attack_defaults, eval_mode
from psat_core.checkpoint import load_member, read_spec
from psat_core.data import load_dataset
from psat_core.ensemble import PSATEnsemble
from psat_core.metrics import evaluate_per_sample, summarize
from psat_core.protocol import attack_suite

NORMS = ("linf", "l2", "l1")


def robust_accuracy(model, x_adv, y) -> float:
    with torch.no_grad(), eval_mode(model):
        return (model(x_adv).argmax(1) == y).float().mean().item()


def independent(model, x, y, eps: dict[str, float], classes: int) -> dict[str, float]:
    """Accuracy under the field's suites, per "<norm>/<attack>", and their worst per norm."""
    out: dict[str, float] = {}
    correct = {n: torch.ones(len(y), dtype=torch.bool) for n in NORMS}
    with eval_mode(model):
        for norm, name in (("linf", "Linf"), ("l2", "L2")):
            aa = torchattacks.AutoAttack(model, norm=name, eps=eps[norm], n_classes=classes, seed=0)
            x_adv = aa(x, y)
            with torch.no_grad():
                ok = model(x_adv).argmax(1) == y
            out[f"{norm}/torchattacks.AutoAttack"] = ok.float().mean().item()
            correct[norm] &= ok
        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
        l1 = {
            "foolbox.SparseL1Descent(q=0.99)": foolbox.attacks.SparseL1DescentAttack(
                steps=100, quantile=0.99, abs_stepsize=eps["l1"] / 10
            ),
            "foolbox.SparseL1Descent(q=0.90)": foolbox.attacks.SparseL1DescentAttack(
                steps=100, quantile=0.90, abs_stepsize=eps["l1"] / 10
            ),
            "foolbox.L1PGD": foolbox.attacks.L1PGD(steps=100, abs_stepsize=eps["l1"] / 10),
            "foolbox.EAD": foolbox.attacks.EADAttack(steps=100),
            "foolbox.L1FMN": foolbox.attacks.L1FMNAttack(steps=100),
        }
        for name, attack in l1.items():
            _, x_adv, _ = attack(fmodel, x, y, epsilons=eps["l1"])
            with torch.no_grad():
                ok = model(x_adv).argmax(1) == y
            out[f"l1/{name}"] = ok.float().mean().item()
            correct["l1"] &= ok
    return out | {n: correct[n].float().mean().item() for n in NORMS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="+", required=True, help="NORM=DIR ...")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dirs = dict(item.split("=", 1) for item in args.members)
    spec = read_spec(next(iter(dirs.values())))
    data = load_dataset(spec.dataset, "test", "~/.psat/data").subset(args.images, seed=args.seed)
    x, y = data.to_float(), data.labels
    eps = {n: c.eps for n, c in attack_defaults(spec.dataset, "eval").items()}
    models = {f"H_{n}": load_member(d).eval() for n, d in dirs.items()}
    models["PSAT"] = PSATEnsemble(list(models.values()), names=list(dirs)).eval()
    print(f"{spec.dataset}: {args.images} test images, radii {eps}")
    for label, model in models.items():
        ensemble = isinstance(model, PSATEnsemble)
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        forward = time.perf_counter() - start
        rows = {}
        for suite in ("paper", "strong"):
            torch.manual_seed(args.seed)
            attacks = attack_suite(
                suite, attack_defaults(spec.dataset, "eval"), ensemble=ensemble, seed=args.seed
            )
            start = time.perf_counter()
            result = evaluate_per_sample(model, x, y, attacks)
            rows[suite] = (summarize(result), time.perf_counter() - start)
        theirs = independent(model, x, y, eps, spec.num_classes)
        print(f"\n## {label}")
        print("| norm | psat paper | psat strong | field's best | field's attacks |")
        print("| --- | --- | --- | --- | --- |")
        for norm in NORMS:
            cells = ", ".join(
                f"{k.split('/', 1)[1]} {100 * v:.1f}%"
                for k, v in theirs.items()
                if k.startswith(f"{norm}/")
            )
            print(
                f"| {norm} | {100 * rows['paper'][0][norm]:.1f}% | "
                f"{100 * rows['strong'][0][norm]:.1f}% | {100 * theirs[norm]:.1f}% | {cells} |"
            )
        strong = rows["strong"][0]
        each = ", ".join(f"{k} {100 * strong[k]:.1f}%" for k in sorted(strong) if "/" in k)
        print(f"strong, each attack: {each}")
        for suite, (_, seconds) in rows.items():
            print(
                f"{suite}: {seconds:.1f} s = {seconds / args.images * 1000:.1f} ms/image "
                f"= {seconds / forward:.0f}x one natural forward pass ({forward * 1000:.1f} ms)"
            )


if __name__ == "__main__":
    main()
