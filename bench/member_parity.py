"""Member parity: is each PSAT member H_ℓp as robust on its own norm as the plain-ResNet
specialist AT_ℓp trained on the same budget (the premise of the paper's Table 3)?

For every norm of `training.members` and every seed, trains AT_ℓp (plain ResNet) and H_ℓp (the
hypernetwork at `model.embedding_dim`) in processes of their own with the workers' `Fit`
(`train_in_process`), evaluates both on the same `--eval-size` images under
`evaluation.suite` and reads the paper's protocol (per-norm PGD) off the same run. Prints per
norm the gap (AT's own-norm accuracy minus H's, mean over seeds) with its 95% interval from a
two-stage paired bootstrap (seeds, then images within them), each seed's gap, and the
train/val curves.

    python bench/member_parity.py [--config jobs/configs/reproduce_digits.yaml]
        [--seeds 0 1] [--eval-size 360] [--set model.init=shared ...]
        [--norms linf] [--kinds H]   # a screen: each model's own-norm accuracy ± its SE
        [--h-set training.epochs=12 ...]   # a shared setting, for the H members only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from orchestrator.config import JobConfig, deep_merge, load_config, parse_overrides
from orchestrator.evaluation.tasks import final_attacks
from orchestrator.runtime.shards import materialize, read_arrays
from orchestrator.training.fit import train_in_process
from orchestrator.training.plan import ModelPlan
from psat_core.attacks.suites import paper_view
from psat_core.metrics import (
    evaluate_per_sample,
    example_scores,
    paired_bootstrap,
    standard_error,
)

PROTOCOLS = ("paper", "full")


def fit_and_evaluate(job_dict: dict, manifest: dict, plan: ModelPlan) -> dict:
    """Train one model on one core and evaluate it: per-image scores under both protocols."""
    torch.set_num_threads(1)
    job = JobConfig.model_validate(job_dict)
    train, val = read_arrays(manifest["train"][0]), read_arrays(manifest["val"])
    test = read_arrays(manifest["eval"])
    history: list[dict] = []
    started = time.perf_counter()
    model = train_in_process(job, plan, train, val, on_epoch=history.append).net.eval()
    trained = time.perf_counter() - started
    attacks = final_attacks(job, ensemble=False, seed=job.data.seed)
    per = evaluate_per_sample(model, test.to_float(), test.labels, attacks, seed=job.data.seed)
    views = {"full": per, "paper": paper_view(per)}
    return {
        "scores": {p: example_scores(views[p]) for p in PROTOCOLS},
        "history": history,
        "seconds": (trained, time.perf_counter() - started - trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/reproduce_digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-size", type=int, default=360)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--norms", nargs="+", help="default: training.members")
    parser.add_argument("--kinds", nargs="+", default=["AT", "H"], help="AT and/or H")
    parser.add_argument(
        "--h-set", action="append", default=[], help="an override for the H members only"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = parse_overrides(args.set) | {"name": "parity"}
        overrides["data"] = overrides.get("data", {}) | {"eval_size": args.eval_size}
        job = load_config(args.config, overrides | {"storage": {"path": tmp}})
        manifest = materialize(job, f"{tmp}/data", 1)
        print(f"config {args.config} {' '.join(args.set)}: {job.model.arch}, "
              f"embedding {job.model.embedding_dim}, init {job.model.init}, H "
              f"{job.training.optimizer.model_dump()} lr {job.training.lr} weight decay "
              f"{job.training.weight_decay}, AT {job.training.baselines.model_dump()}, "
              f"{job.training.epochs} epochs, seeds {args.seeds}, {args.eval_size} eval images, "
              f"suite {job.evaluation.suite}", flush=True)  # fmt: skip
        jobs = {"AT": job, "H": load_config(args.config, deep_merge(
            overrides | {"storage": {"path": tmp}}, parse_overrides(args.h_set)))}  # fmt: skip
        if args.h_set:
            print(f"H only: {' '.join(args.h_set)}", flush=True)
        tasks = {}
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            for seed in args.seeds:
                for norm in args.norms or job.training.members:
                    for kind, dim in (("AT", None), ("H", job.model.embedding_dim)):
                        if kind not in args.kinds:
                            continue
                        kind_job = jobs[kind]
                        seeded = kind_job.model_copy(
                            update={"training": kind_job.training.model_copy(update={"seed": seed})}
                        ).model_dump()
                        plan = ModelPlan(f"{kind}_{norm}", "at", (norm,), dim)
                        tasks[seed, norm, kind] = pool.submit(
                            fit_and_evaluate, seeded, manifest, plan
                        )
            results = {key: task.result() for key, task in tasks.items()}
    report(results, args.seeds, args.norms or job.training.members, args.kinds)


def report(results: dict, seeds: list[int], norms: list[str], kinds: list[str]) -> None:
    for (seed, norm, kind), result in results.items():
        trained, evaluated = result["seconds"]
        curve = "  ".join(
            f"e{h['epoch']} loss {h['loss']:.3f} val {h[f'val_{norm}']:.3f}"
            for h in result["history"]
        )
        print(f"seed {seed} {kind}_{norm}: trained {trained:.0f} s, evaluated {evaluated:.0f} s; "
              f"{curve}")  # fmt: skip
    if kinds != ["AT", "H"]:
        for (seed, norm, kind), result in results.items():
            for protocol in PROTOCOLS:
                own = result["scores"][protocol][norm]
                print(f"seed {seed} {kind}_{norm} {protocol}: {100 * own.mean():.2f}% ± "
                      f"{100 * standard_error(own):.2f}")  # fmt: skip
        return
    print(
        "\nown-norm accuracy, AT_p - H_p in points (mean over seeds), 95% CI over seeds and images"
    )
    print("| norm | protocol | AT_p | H_p | gap | 95% CI | per seed |")
    print("|---|---|---|---|---|---|---|")
    for norm in norms:
        for protocol in PROTOCOLS:
            at, h = ([results[s, norm, kind]["scores"][protocol][norm] for s in seeds]
                     for kind in ("AT", "H"))  # fmt: skip
            gap, low, high = paired_bootstrap(torch.stack(at), torch.stack(h))  # seeds x images
            gaps = [100 * (a.mean() - b.mean()) for a, b in zip(at, h, strict=True)]
            per_seed = ", ".join(f"{g:+.1f}" for g in gaps)
            print(f"| {norm} | {protocol} | {100 * torch.cat(at).mean():.2f}% | "
                  f"{100 * torch.cat(h).mean():.2f}% | {100 * gap:+.2f} | "
                  f"[{100 * low:+.2f}, {100 * high:+.2f}] | {per_seed} |")  # fmt: skip


if __name__ == "__main__":
    main()
