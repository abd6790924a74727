"""The GPU training path of a model, as Ray Train runs it on one GPU per model.

`--method at` (default): a PSAT member, a HyperResNet trained on an AT-ℓ∞ batch. `--method mng`:
AT_mng's plain ResNet with its noise generator, a norm drawn per step (CIFAR-10's training
attacks). The model in channels_last, wrapped in DistributedDataParallel (NCCL, world size 1:
the wrapping Ray Train's `prepare_model` applies), trained with `psat_core.steps.train_step`
and bf16 autocast; then the same without DDP. Reports the step time of both, the memory peak,
and the loss over the steps on one fixed batch (it must fall).

    python bench/gpu_path.py [--method at] [--arch resnet18] [--embedding-dim 64]
                             [--batch 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from psat_core.models import create_model
from psat_core.settings import attack_defaults
from psat_core.steps import make_optimizer, train_step, training_inputs


def run(model, x, y, inputs, steps: int) -> tuple[list[float], list[float]]:
    optimizer = make_optimizer(model.parameters(), lr=0.01)
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        stats = train_step(model, x, y, optimizer, inputs, amp=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(stats["loss"])
    return losses, times


def build(args, device: torch.device):
    """The model (channels_last, on `device`), its training method and what it is."""
    attacks = attack_defaults("cifar10", "train")
    if args.method == "mng":
        model = create_model(args.arch, num_classes=10)
        inputs = training_inputs("mng", attacks, in_channels=3, device=device)
        steps = ", ".join(f"{norm} {cfg.steps}" for norm, cfg in attacks.items())
        name = f"AT_mng {args.arch} (PGD steps {steps}, one norm per batch)"
    else:
        model = create_model(f"hyper_{args.arch}", num_classes=10, embedding_dim=args.embedding_dim)
        inputs = training_inputs("at", {"linf": attacks["linf"]})
        name = f"hyper_{args.arch} z={args.embedding_dim} (PGD linf {attacks['linf'].steps} steps)"
    return model.to(device, memory_format=torch.channels_last), inputs, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("at", "mng"), default="at")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_path: no CUDA device")
    device = torch.device("cuda")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (args.batch,), device=device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast")
    for wrapped in (True, False):
        torch.manual_seed(0)
        model, inputs, name = build(args, device)
        if wrapped:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        torch.cuda.reset_peak_memory_stats()
        losses, times = run(model, x, y, inputs, args.steps)
        step = statistics.median(times[3:])
        label = "DDP" if wrapped else "bare"
        first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
        print(
            f"{label:<5} {name} batch {args.batch}: "
            f"{step * 1000:.1f} ms/step (median after 3 warm-up steps) = "
            f"{args.batch / step:.0f} images/s; "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
            f"loss, mean of the first and last 5 steps, {first:.3f} -> {last:.3f}"
        )
        if not last < first:
            raise SystemExit(f"{label}: the loss did not fall on a fixed batch")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
