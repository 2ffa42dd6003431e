"""Stage-1 training throughput: the device-resident path against the authors' reference path.

Both paths train the same ResNet-32 (100 classes) with the same SGD, schedule, batch size, device
and autocast setting through the same `trainables.loop.train_epoch`; only the batches differ:

- device-resident: `LTDataset.loader(...)`, i.e. `trainables.loader.DeviceLoader` (uint8 images
  on the device, crop / flip / normalise as batched tensor ops);
- reference: what LDAM-DRW / DRO-LT / LTR-weight-balancing do, a per-sample Dataset returning one
  PIL image through torchvision transforms, behind a multi-worker DataLoader.

Data are CIFAR-shaped random uint8 images with the CIFAR-100-LT (imbalance 100) class counts,
10,847 training images by default. Images per second are taken over `--steps` steps after
`--warmup` steps (which absorb worker start-up and first-call kernel set-up).

    python benchmarks/throughput.py                      # CPU, prints both rates and the ratio
    python benchmarks/throughput.py --device cuda --json results.jsonl
    python benchmarks/throughput.py --device cuda --full-stage1   # 200-epoch stage 1 wall time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.config import ConfigError, TrialConfig  # noqa: E402
from trainables.data import ArraySplit, LTDataset, register_dataset  # noqa: E402
from trainables.datasets.cifar import CIFAR_MEAN, CIFAR_STD  # noqa: E402
from trainables.loop import EpochStats, train_epoch  # noqa: E402
from trainables.lt_profile import long_tail_counts  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.pipeline import resolve_device, run_trial  # noqa: E402
from trainables.schedules import make_scheduler  # noqa: E402

NUM_CLASSES = 100
# CIFAR-100-LT, imbalance 100: 10,847 training images; holdout val 20 / class, test 100 / class.
LT_COUNTS = long_tail_counts(500, NUM_CLASSES, 100.0)
LT_TRAIN, LT_VAL, LT_TEST = sum(LT_COUNTS), 20 * NUM_CLASSES, 100 * NUM_CLASSES
SYNTHETIC_NAME = "synthetic_cifar100_lt"
# Stage 1 as the DRO-LT recipe runs it (TrialConfig defaults, PRESETS["dro_lt_paper"]).
RECIPE = TrialConfig.from_dict({"epochs": 200})
STAGE1 = RECIPE.stage1


# ---------------------------------------------------------------- data
def synthetic_cifar_lt(num_images: int = LT_TRAIN, seed: int = 0) -> LTDataset:
    """CIFAR-100-LT-shaped random uint8 images; val / test scale with `num_images`."""
    generator = torch.Generator().manual_seed(seed)
    full = torch.repeat_interleave(torch.arange(NUM_CLASSES), torch.tensor(LT_COUNTS))
    # evenly spaced picks keep the long-tailed shape at any size (repeats when num_images > 10,847)
    train_labels = full[torch.arange(num_images) * LT_TRAIN // num_images]

    def split(labels: torch.Tensor) -> ArraySplit:
        shape = (labels.numel(), 3, 32, 32)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        return ArraySplit(images, labels)

    def balanced(size: int) -> torch.Tensor:
        return torch.arange(max(1, size * num_images // LT_TRAIN)) % NUM_CLASSES

    return LTDataset(
        name=SYNTHETIC_NAME,
        num_classes=NUM_CLASSES,
        class_counts=torch.bincount(train_labels, minlength=NUM_CLASSES).tolist(),
        protocol="holdout",
        splits={
            "train": split(train_labels),
            "val": split(balanced(LT_VAL)),
            "test": split(balanced(LT_TEST)),
        },
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        crop_padding=4,
        flip=True,
        image_size=32,
        default_model="resnet32",
        info={"synthetic": True, "imbalance": 100.0},
    )


class PilCifarDataset(Dataset):
    """The authors' training set: HWC uint8 array, one PIL image per item through transforms."""

    def __init__(self, split: ArraySplit, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # as torchvision's CIFAR
        self.targets = split.labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.data[index])
        return self.transform(image), self.targets[index]


def reference_batches(
    dataset: LTDataset, batch_size: int, device: torch.device, workers: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader as in the authors' train loops, moved to the device like their `.cuda()`."""
    loader = DataLoader(
        PilCifarDataset(dataset.splits["train"], dataset.mean, dataset.std),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )

    class OnDevice:
        def __len__(self) -> int:
            return len(loader)

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for images, labels in loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return OnDevice()


def endless(batches: Iterable) -> Iterator:
    """Epoch after epoch: re-iterating is a new shuffle (and, for a DataLoader, new workers)."""
    while True:
        yield from batches


# ---------------------------------------------------------------- training
def measure(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    steps: int,
    warmup: int,
    seed: int = 0,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> EpochStats:
    """Stage-1 steps (CE, SGD, LDAM schedule) over `batches`; stats of the steps after warm-up.

    `wrap` turns the built model into the one that trains (e.g. `torch.compile`), so a variant
    runs the very same step and schedule."""
    torch.manual_seed(seed)
    model = create_model("resnet32", NUM_CLASSES).to(device)
    if wrap is not None:
        model = wrap(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=STAGE1.lr,
        momentum=STAGE1.momentum,
        weight_decay=STAGE1.weight_decay,
    )
    scheduler = make_scheduler(
        optimizer, STAGE1.schedule, STAGE1.epochs, len(batches), STAGE1.warmup_epochs
    )

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    autocast = RECIPE.runtime.amp and device.type == "cuda"
    stream = endless(batches)
    try:
        if warmup > 0:
            train_epoch(islice(stream, warmup), loss_fn, optimizer, scheduler, autocast=autocast)
        # train_epoch syncs the device at its end, so the measured call starts from an idle queue
        return train_epoch(islice(stream, steps), loss_fn, optimizer, scheduler, autocast=autocast)
    finally:
        stream.close()  # stops DataLoader workers now, not when the next path is being timed


def compare(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dataset = synthetic_cifar_lt(args.images)
    device_batches = dataset.loader(
        "train",
        batch_size=args.batch_size,
        device=device,
        augment=True,
        sampler="instance",
        shuffle=True,
    )
    resident = measure(device_batches, device, args.steps, args.warmup)
    reference = measure(
        reference_batches(dataset, args.batch_size, device, args.workers),
        device,
        args.steps,
        args.warmup,
    )
    ratio = resident.images_per_second / reference.images_per_second
    print(f"device-resident: {_rate(resident)}")
    print(f"reference (DataLoader, {args.workers} workers): {_rate(reference)}")
    print(f"ratio (device-resident / reference): {ratio:.2f}x")
    return {
        "mode": "ratio",
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "device_resident_images_per_s": resident.images_per_second,
        "reference_images_per_s": reference.images_per_second,
        "ratio": ratio,
    }


def full_stage1(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The real pipeline's stage 1 (per-epoch validation included) for `--epochs` epochs."""
    dataset = synthetic_cifar_lt(args.images)
    register_dataset(SYNTHETIC_NAME, scale="cifar", n_max=None,
                     default_model="resnet32")(lambda **_: dataset)
    config = {
        "dataset": SYNTHETIC_NAME,
        "model": "resnet32",
        "device": device.type,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "method": "ce",
        "classifier": "none",
    }
    started = time.perf_counter()
    result = run_trial(config)
    wall = time.perf_counter() - started
    history = result["history"]
    train_seconds = sum(row["train_seconds"] for row in history)
    rates = [row["images_per_second"] for row in history]
    print(
        f"full stage 1 ({len(history)} epochs, {args.images} images): "
        f"wall {wall:.1f} s (training {train_seconds:.1f} s, the rest validation / set-up), "
        f"median {statistics.median(rates):.0f} images/s per epoch, status {result['status']}"
    )
    return {
        "mode": "full_stage1",
        "epochs": len(history),
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "median_epoch_images_per_s": statistics.median(rates),
        "status": result["status"],
    }


# ---------------------------------------------------------------- report
def _rate(stats: EpochStats) -> str:
    return (
        f"{stats.images_per_second:.1f} images/s ({stats.images} images in {stats.seconds:.2f} s)"
    )


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {
        "device": device.type,
        "device_name": name,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=_positive, default=STAGE1.batch_size)
    parser.add_argument("--images", type=_positive, default=LT_TRAIN)
    parser.add_argument("--steps", type=_positive, help="measured steps (cpu 20, cuda 300)")
    parser.add_argument("--warmup", type=_non_negative, help="warm-up steps (cpu 3, cuda 30)")
    parser.add_argument("--workers", type=_non_negative, help="reference workers (cpu 2, cuda 8)")
    parser.add_argument(
        "--full-stage1", action="store_true", help="time the pipeline's whole stage 1 instead"
    )
    parser.add_argument("--epochs", type=_positive, default=STAGE1.epochs, help="for --full-stage1")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also write one JSON line: to stdout, or appended to PATH",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    args.steps = args.steps or (300 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (30 if gpu else 3)
    args.workers = args.workers if args.workers is not None else (8 if gpu else 2)
    info = machine_info(device)
    load = info["load_average"]
    print(
        f"machine: {info['device_name']} ({info['device']}), {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch threads, "
        f"torch {info['torch']}, batch {args.batch_size}, {args.images} images"
        + (f", load average {load[0]:.2f}" if load else "")
    )
    outcome = full_stage1(args, device) if args.full_stage1 else compare(args, device)
    record = {**info, "batch_size": args.batch_size, "images": args.images, **outcome}
    if args.json == "-":
        print(json.dumps(record))
    elif args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
