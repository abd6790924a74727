"""HyperResNet vs the plain ResNet of the same shape: wall-time ratio of training steps.

(a) natural step: forward, backward, SGD step;
(b) adversarial step: 10-step l_inf PGD, then the update (psat_core.steps.train_step).
Targets (issue #2): (b) <= 1.05 and (a) <= 1.10.

    python bench/hyper_speed.py [--batch 128] [--repeats 3] [--archs resnet18:64 resnet50:128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from psat_core.models import create_model
from psat_core.settings import AttackConfig
from psat_core.steps import make_optimizer, train_step, training_inputs


def time_step(model, optimizer, x, y, inputs, amp: bool) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(model, x, y, optimizer, inputs, amp)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_times(plain, hyper, x, y, inputs, repeats: int, amp: bool) -> list[tuple[float, float]]:
    """(plain, hyper) step times, run in pairs whose order alternates, so that load changes on a
    shared machine and warm caches favour neither side."""
    models = (plain, hyper)
    optimizers = [make_optimizer(m.parameters(), lr=0.01) for m in models]
    for model, optimizer in zip(models, optimizers, strict=True):
        time_step(model, optimizer, x, y, inputs, amp)  # warm-up
    pairs = []
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        times = {j: time_step(models[j], optimizers[j], x, y, inputs, amp) for j in order}
        pairs.append((times[0], times[1]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["resnet18:64", "resnet50:128"])
    parser.add_argument("--pgd-steps", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    pgd = AttackConfig("linf", eps=8 / 255, steps=args.pgd_steps, step_size=2 / 255)
    steps = {
        "natural": training_inputs("nat", {}),
        "adversarial": training_inputs("at", {"linf": pgd}),
    }
    print(f"device {device}, batch {args.batch}, threads {torch.get_num_threads()}, amp {amp}")
    print(
        f"{'arch':<10} {'z':>4} {'step':<12} {'plain s':>9} {'hyper s':>9} {'ratio':>7} "
        f"{'pair med':>9}"
    )
    print("(median step times over pairs run in alternating order; ratio = hyper / plain of the")
    print(" medians; pair med = median of the per-pair ratios)")
    for spec in args.archs:
        arch, dim = spec.split(":")
        plain = create_model(arch, num_classes=10).to(device)
        hyper = create_model(f"hyper_{arch}", num_classes=10, embedding_dim=int(dim)).to(device)
        if device.type == "cuda":
            plain = plain.to(memory_format=torch.channels_last)
            hyper = hyper.to(memory_format=torch.channels_last)
        for name, inputs in steps.items():
            pairs = paired_times(plain, hyper, x, y, inputs, args.repeats, amp)
            t_plain = statistics.median(p for p, _ in pairs)
            t_hyper = statistics.median(h for _, h in pairs)
            per_pair = statistics.median(h / p for p, h in pairs)
            print(
                f"{arch:<10} {dim:>4} {name:<12} {t_plain:>9.3f} {t_hyper:>9.3f} "
                f"{t_hyper / t_plain:>7.3f} {per_pair:>9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
