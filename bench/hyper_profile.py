"""Where a HyperResNet training step spends the time its plain ResNet does not (issue 27).

For each architecture, on the GPU when there is one (bf16 autocast, channels_last), else CPU:
  1. the step ratio hyper / plain, natural and adversarial (`hyper_speed.paired_times`);
  2. the weight generation alone (`HyperResNet.generate`, forward + backward, as one training
     step pays it once) and its share of the hyper step;
  3. a torch.profiler table of one adversarial hyper step: the operators by self time, so the
     generation's GEMMs, the tiling copies and autograd through the generator are named.
With --trace DIR, a Chrome trace per architecture goes to DIR.

    python bench/hyper_profile.py [--batch 128] [--archs resnet18:64 resnet50:128] [--trace DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hyper_speed import paired_times  # bench/ is on sys.path when run as a script
from torch.profiler import ProfilerActivity, profile

from psat_core.models import create_model
from psat_core.settings import AttackConfig
from psat_core.steps import make_optimizer, train_step, training_inputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generation_time(model, device: torch.device, amp: bool, repeats: int) -> float:
    """Median seconds of generating every conv weight and back-propagating through it."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            weights = model.generate()
        sum(w.float().square().sum() for w in weights).backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=["resnet18:64", "resnet50:128"])
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--trace", type=Path, help="folder for Chrome traces")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.image, args.image, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    pgd = AttackConfig("linf", eps=8 / 255, steps=args.pgd_steps, step_size=2 / 255)
    steps = {
        "natural": training_inputs("nat", {}),
        "adversarial": training_inputs("at", {"linf": pgd}),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if amp else [])
    sort_by = "self_cuda_time_total" if amp else "self_cpu_time_total"
    print(f"device {device}, batch {args.batch}, amp {amp}, torch {torch.__version__}")
    for spec in args.archs:
        arch, dim = spec.split(":")
        plain = create_model(arch, num_classes=10).to(device)
        hyper = create_model(f"hyper_{arch}", num_classes=10, embedding_dim=int(dim)).to(device)
        if amp:
            plain = plain.to(memory_format=torch.channels_last)
            hyper = hyper.to(memory_format=torch.channels_last)
        hyper_step = {}
        for name, inputs in steps.items():
            pairs = paired_times(plain, hyper, x, y, inputs, args.repeats, amp)
            t_plain = statistics.median(p for p, _ in pairs)
            hyper_step[name] = statistics.median(h for _, h in pairs)
            print(f"{arch} z={dim} {name}: plain {t_plain:.4f} s, hyper {hyper_step[name]:.4f} s,"
                  f" ratio {hyper_step[name] / t_plain:.3f}")  # fmt: skip
        generate = generation_time(hyper.train(), device, amp, args.repeats)
        share = {name: 100 * generate / t for name, t in hyper_step.items()}
        print(f"{arch} z={dim} generation (forward + backward): {generate:.4f} s = "
              f"{share['natural']:.1f}% of a natural hyper step, "
              f"{share['adversarial']:.1f}% of an adversarial one")  # fmt: skip
        optimizer = make_optimizer(hyper.parameters(), lr=0.01)
        with profile(activities=activities, record_shapes=True) as prof:
            train_step(hyper, x, y, optimizer, steps["adversarial"], amp)
            synchronize(device)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=15))
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace / f"{arch}_z{dim}.json"))


if __name__ == "__main__":
    main()
