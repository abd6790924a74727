"""Throughput of psat's PGD against torchattacks' PGD (ℓ∞) and PGDL2 (ℓ2) on the same model/batch.

Same budget for both (ε, steps, step size, random start); each repeat runs both attacks in
alternating order; the median time of the repeats is reported as examples per second, with the
spread of the per-repeat (paired) ratios. Target: ours >= 1.0x torchattacks' throughput. Uses
CUDA when available, else the CPU.

Work per call: torchattacks takes `steps` forward/backward passes and returns the last iterate;
ours takes the same passes plus one gradient-free forward pass that scores the last iterate, so
that the worst iterate of every example is returned (the other iterates are scored by the
forward pass of their own gradient step).

    python bench/attack_speed.py [--model small|resnet18] [--batch 128] [--steps 10] [--repeats 7]
                                 [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchattacks
import torchvision
from torch import nn

from psat_core.attacks import PGD, L2Ball, LinfBall


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def small_resnet(num_classes: int = 10) -> nn.Module:
    """A ResNet-ish net for 32x32 inputs: stem + three stages (32, 64, 128) of one block each."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        _Block(32, 32, 1),
        _Block(32, 64, 2),
        _Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def resnet18_32(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 adapted to 32x32 inputs (3x3 stem, stride 1, no max-pool)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def seconds(run: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "resnet18"], default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = args.model or ("resnet18" if device.type == "cuda" else "small")
    torch.manual_seed(0)
    model = (resnet18_32() if arch == "resnet18" else small_resnet()).to(device).eval()
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    budgets = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.125)}
    ours = {
        "linf": PGD(LinfBall(budgets["linf"][0]), args.steps, budgets["linf"][1]),
        "l2": PGD(L2Ball(budgets["l2"][0]), args.steps, budgets["l2"][1]),
    }
    theirs = {
        "linf": torchattacks.PGD(
            model, eps=budgets["linf"][0], alpha=budgets["linf"][1], steps=args.steps
        ),
        "l2": torchattacks.PGDL2(
            model, eps=budgets["l2"][0], alpha=budgets["l2"][1], steps=args.steps
        ),
    }

    print(
        f"device {device}, model {arch}, batch {args.batch}, steps {args.steps}, "
        f"repeats {args.repeats} (median), threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}"
    )
    print("ours: eval PGD (worst iterate kept, one extra scoring pass); train: last iterate")
    print(f"{'norm':<5} {'attack':<6} {'ex/s':>8} {'torchattacks ex/s':>18} {'ratio':>7}")
    for norm in ("linf", "l2"):
        runs = {
            "ours": lambda n=norm: ours[n](model, x, y),
            "train": lambda n=norm: ours[n].last_iterate(model, x, y),
            "theirs": lambda n=norm: theirs[n](x, y),
        }
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(args.repeats):
            names = list(runs) if i % 2 == 0 else list(reversed(runs))
            for name in names:
                times[name].append(seconds(runs[name], device))
        theirs_tp = args.batch / statistics.median(times["theirs"])
        for name in ("ours", "train"):
            tp = args.batch / statistics.median(times[name])
            print(f"{norm:<5} {name:<6} {tp:>8.1f} {theirs_tp:>18.1f} {tp / theirs_tp:>6.2f}x")


if __name__ == "__main__":
    main()
