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
        [--h-set training.epochs=12 ...]   # a setting for the H members only (model.*,
                                           # training.*, attacks.train.*); shared ones refused
        [--cache DIR]   # each model's result kept there and reused by a later run whose
                        # settings for that model are the same (AT across H screens)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
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
# what AT and H must share for a fair comparison (and the bench sets): refused in --h-set
SHARED = ("name", "data", "storage", "tracking", "registry", "reproduce", "sweep", "resources",
          "evaluation", "attacks.eval", "training.seed")  # fmt: skip


def h_only(settings: list[str]) -> list[str]:
    """The --h-set overrides, each checked to be one that H may have alone."""
    for setting in settings:
        key = setting.partition("=")[0].strip()
        if any(key == shared or key.startswith(f"{shared}.") for shared in SHARED):
            print(
                f"member_parity.py: error: --h-set {key}: AT and H share it (data, seeds, the "
                "evaluation, where runs go); set it for both with --set",
                file=sys.stderr,
            )
            sys.exit(2)
    return settings


def cached(cache: str | None, job_dict: dict, manifest: dict, plan: ModelPlan) -> dict:
    """`fit_and_evaluate`'s result, from `cache` when a run with the same settings for this model
    (everything but where the run's files go) left it there."""
    if cache is None:
        return fit_and_evaluate(job_dict, manifest, plan)
    settings = {k: v for k, v in job_dict.items() if k not in ("storage", "name")}
    key = json.dumps([settings, plan.name, plan.method, plan.norms, plan.embedding_dim],
                     sort_keys=True, default=str)  # fmt: skip
    path = os.path.join(cache, f"{plan.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    result = fit_and_evaluate(job_dict, manifest, plan)
    os.makedirs(cache, exist_ok=True)
    torch.save(result, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return result


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
    parser.add_argument("--cache", help="a folder keeping each model's result for later runs")
    args = parser.parse_args()
    h_only(args.h_set)
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
        norms = args.norms or job.training.members
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            tasks = {
                key: pool.submit(cached, args.cache, job_dict, manifest, plan)
                for key, job_dict, plan in model_tasks(jobs, args.seeds, norms, args.kinds)
            }
            results = {key: task.result() for key, task in tasks.items()}
    report(results, args.seeds, norms, args.kinds)


def model_tasks(jobs: dict[str, JobConfig], seeds: list[int], norms: list[str], kinds: list[str]):
    """``((seed, norm, kind), job dict, plan)`` per model: AT_ℓp a plain ResNet of the AT job,
    H_ℓp a hypernetwork of the H job (its own --h-set settings, embedding dimension included)."""
    for seed in seeds:
        for norm in norms:
            for kind in kinds:
                job = jobs[kind]
                dim = None if kind == "AT" else job.model.embedding_dim
                seeded = job.model_copy(
                    update={"training": job.training.model_copy(update={"seed": seed})}
                )
                plan = ModelPlan(f"{kind}_{norm}", "at", (norm,), dim)
                yield (seed, norm, kind), seeded.model_dump(), plan


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
