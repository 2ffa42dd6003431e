"""Channels-last against contiguous (NCHW) memory format: one SGD training step on the CPU.

A step is forward + cross-entropy + backward + SGD (momentum 0.9, weight decay 5e-4), float32,
in train mode (BatchNorm batch statistics), on random inputs of a fixed batch. Cases:

- resnet32_cifar: `create_model("resnet32", 100)` on 3x32x32 images (CIFAR-100-LT's model);
- digits: the digits_lt default model (`create_model("resnet32", 10, in_channels=1)`) on its
  1x8x8 images (trainables/datasets/digits.py: default_model, image_size).

Each case runs unfused (one `nn.Module`) and fused (`trainables.fused.stack.StackedModel` of K
members under vmap; channels-last there means every member's slice of the stacked conv weights
and of the stacked input batch has channels-last strides). "channels_last" converts the model
AND the input batch. Per torch thread count, every mode is built and warmed up, then the modes
are timed in turn (interleaved) `--repeats` times, `--steps` steps each; the reported rate is the
median over repeats of images per second (a fused step trains K * batch images).

    python benchmarks/channels_last.py                        # both cases, threads 1 and 2
    python benchmarks/channels_last.py --cases digits --threads 1 --fuse 4 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.fused.stack import StackedModel  # noqa: E402
from trainables.models import create_model  # noqa: E402

# name: (model, classes, channels, image size)
CASES = {
    "resnet32_cifar": ("resnet32", 100, 3, 32),
    "digits": ("resnet32", 10, 1, 8),
}
FORMATS = ("contiguous", "channels_last")


def stacked_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """[K, N, C, H, W] with each [N, C, H, W] slice in channels-last strides; others unchanged."""
    if tensor.dim() != 5:
        return tensor
    return tensor.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def unfused_step(case: str, fmt: str, batch: int) -> Callable[[], None]:
    name, classes, channels, size = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, classes, channels)
    images = torch.randn(batch, channels, size, size)
    labels = torch.randint(0, classes, (batch,))
    if fmt == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def fused_step(case: str, fmt: str, batch: int, k: int) -> Callable[[], None]:
    name, classes, channels, size = CASES[case]
    torch.manual_seed(0)
    stack = StackedModel([create_model(name, classes, channels) for _ in range(k)])
    images = torch.randn(k, batch, channels, size, size)
    labels = torch.randint(0, classes, (k, batch))
    if fmt == "channels_last":
        stack.params = {n: stacked_channels_last(v.detach()).requires_grad_(True)
                        for n, v in stack.params.items()}
        images = stacked_channels_last(images)
    opt = torch.optim.SGD(list(stack.params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        _, logits = stack.train_forward(images)
        loss = vmap(F.cross_entropy)(logits, labels).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure_case(case: str, threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    modes: dict[tuple[str, str], tuple[Callable[[], None], int]] = {}
    for fmt in FORMATS:
        modes[("unfused", fmt)] = (unfused_step(case, fmt, args.batch), args.batch)
        if args.fuse:
            modes[(f"fused{args.fuse}", fmt)] = (fused_step(case, fmt, args.batch, args.fuse),
                                                 args.batch * args.fuse)
    for step, _ in modes.values():
        for _ in range(args.warmup):
            step()
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in modes}
    for _ in range(args.repeats):
        for key, (step, images) in modes.items():  # interleaved: load drifts hit every mode
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[key].append(images * args.steps / (time.perf_counter() - start))
    rows = []
    for (path, fmt), values in rates.items():
        rows.append({"case": case, "threads": threads, "path": path, "format": fmt,
                     "batch": args.batch, "images_per_second": statistics.median(values),
                     "runs": [round(v, 1) for v in values]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--fuse", type=int, default=4, help="members of the fused stack (0: skip)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="append one JSON line per measurement to this file")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    for case in args.cases:
        for threads in args.threads:
            rows = measure_case(case, threads, args)
            base = {r["path"]: r["images_per_second"] for r in rows
                    if r["format"] == "contiguous"}
            for row in rows:
                row["speedup"] = row["images_per_second"] / base[row["path"]]
                row["load"] = round(os.getloadavg()[0], 2)
                print(f"{case:15s} threads={threads} {row['path']:8s} {row['format']:13s} "
                      f"{row['images_per_second']:9.1f} img/s  x{row['speedup']:.2f}  "
                      f"runs={row['runs']} load={row['load']}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
