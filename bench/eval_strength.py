"""psat's evaluation suites against the attack suites the field trusts, on trained members.

For every member checkpoint (and the lowest-entropy ensemble of all of them), per norm: robust
accuracy under psat's `paper` suite (PGD), psat's `strong` suite (worst over all its attacks)
and each of its attacks, then torchattacks' AutoAttack (standard; ℓ∞, ℓ2) and foolbox's ℓ1
attacks (SparseL1Descent at the top 1% and 10%, L1PGD, EAD, L1 FMN) at the same radius, and
the time of each suite (`bench/eval_time.py` breaks a row's time down by attack).

    python bench/eval_strength.py --members linf=DIR l2=DIR l1=DIR [--images 200] [--seed 0]
                                  [--threads N]

Uses CUDA when available. Acceptance (issue 16): per norm, psat's `strong` accuracy is at or
below torchattacks' AutoAttack (ℓ∞, ℓ2) and below every foolbox ℓ1 attack; the "verdict"
column says whether it is.

DIR: a member checkpoint folder (`member.json` + `state.pt`), e.g. what `psat train` prints.
"""

from __future__ import annotations

import argparse
import time

import foolbox
import torch
import torchattacks

from psat_core.attacks import eval_mode
from psat_core.attacks.suites import attack_suite
from psat_core.checkpoint import load_member, read_spec
from psat_core.data import load_dataset
from psat_core.ensemble import PSATEnsemble
from psat_core.metrics import evaluate_per_sample, summarize
from psat_core.settings import attack_defaults

NORMS = ("linf", "l2", "l1")


def robust_accuracy(model, x_adv, y) -> float:
    with torch.no_grad(), eval_mode(model):
        return (model(x_adv).argmax(1) == y).float().mean().item()


def independent(model, x, y, eps: dict[str, float], classes: int) -> dict[str, float]:
    """Accuracy under the field's suites, per "<norm>/<attack>", and their worst per norm."""
    out: dict[str, float] = {}
    correct = {n: torch.ones(len(y), dtype=torch.bool, device=y.device) for n in NORMS}
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
    parser.add_argument("--rows", nargs="+", default=None, help="e.g. PSAT H_l1 (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dirs = dict(item.split("=", 1) for item in args.members)
    spec = read_spec(next(iter(dirs.values())))
    data = load_dataset(spec.dataset, "test", "~/.psat/data").subset(args.images, seed=args.seed)
    x, y = data.to_float().to(device), data.labels.to(device)
    eps = {n: c.eps for n, c in attack_defaults(spec.dataset, "eval").items()}
    models = {f"H_{n}": load_member(d).eval().to(device) for n, d in dirs.items()}
    models["PSAT"] = PSATEnsemble(list(models.values()), names=list(dirs)).eval()
    models = {k: v for k, v in models.items() if args.rows is None or k in args.rows}
    print(f"{spec.dataset}: {args.images} test images, radii {eps}, device {device}")
    for label, model in models.items():
        ensemble = isinstance(model, PSATEnsemble)
        rows = {}
        for suite in ("paper", "strong"):
            attacks = attack_suite(
                suite, attack_defaults(spec.dataset, "eval"), ensemble=ensemble, seed=args.seed
            )
            start = time.perf_counter()
            result = evaluate_per_sample(model, x, y, attacks, seed=args.seed)
            rows[suite] = (result, time.perf_counter() - start)
        theirs = independent(model, x, y, eps, spec.num_classes)
        paper, strong = summarize(rows["paper"][0]), summarize(rows["strong"][0])
        print(f"\n## {label}")
        print("| norm | psat paper | psat strong | field's best | verdict | field's attacks |")
        print("| --- | --- | --- | --- | --- | --- |")
        for norm in NORMS:
            field = {k.split("/", 1)[1]: v for k, v in theirs.items() if k.startswith(f"{norm}/")}
            cells = ", ".join(f"{k} {100 * v:.1f}%" for k, v in field.items())
            ok = (
                strong[norm] <= min(field.values())
                if norm != "l1"
                else all(strong[norm] < v or v == 0.0 for v in field.values())
            )
            print(
                f"| {norm} | {100 * paper[norm]:.1f}% | {100 * strong[norm]:.1f}% | "
                f"{100 * theirs[norm]:.1f}% | {'ok' if ok else 'WEAKER'} | {cells} |"
            )
        result = rows["strong"][0]
        found = ", ".join(f"{name} {int(result.found(name).sum())}" for name in result.attack_names)
        print(f"strong, points each attack found first: {found}")
        for suite, (_, seconds) in rows.items():
            print(f"{suite}: {seconds:.1f} s = {seconds / args.images * 1000:.1f} ms/image")


if __name__ == "__main__":
    main()
