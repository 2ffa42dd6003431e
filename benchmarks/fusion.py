"""Fused training throughput: K ResNet-32 members as one model against K separate models.

Aggregate training images per second (K x batch per fused step) on CIFAR-shaped random data
(3 x 32 x 32, 100 classes, batch 128), one training step = forward, cross-entropy, backward,
SGD with momentum and weight decay:

- `sequential`: K separate `create_model("resnet32")` models, each stepped in turn with its own
  `torch.optim.SGD` (what K unfused trials on one device do, without their process overhead);
- `vmap`: the fused path of `trainables.fused` (stacked weights under `torch.func.vmap`,
  per-member SGD on stacked tensors), what `run_trials` runs;
- `grouped`: the HFTA alternative, every convolution one grouped convolution over K members
  and every BatchNorm one BatchNorm over K x channels (written here for the comparison only).

Each measurement: `--warmup` steps, then `--steps` timed steps; the median of `--repeats`.

    python benchmarks/fusion.py                       # CPU; writes benchmarks/results/fusion_cpu.md
    python benchmarks/fusion.py --ks 1 2 4 --modes sequential vmap --steps 2 --repeats 1

`--sweeps SPACE ...`: whole default sweeps instead (`python search/run.py --space S`, embedded
data, 8 trials), unfused and `--fuse K` (`--fuse`, default 8) in turn, `--repeats` pairs: wall
time of the command, the fused/unfused ratio pair by pair, and the share of the machine's slot
time outside training epochs (benchmarks/sweep_overhead.py), medians; writes
benchmarks/results/fusion_sweeps.md.

    python benchmarks/fusion.py --sweeps ce dro_lt --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sweep_overhead import measure as measure_sweep  # noqa: E402
from trainables.fused.sgd import SGDGroup, StackedSGD  # noqa: E402
from trainables.fused.stack import StackedModel  # noqa: E402
from trainables.models import create_model, memory_format  # noqa: E402

NUM_CLASSES = 100
BATCH = 128
IMAGE_SIZE = 32  # CIFAR
LR, MOMENTUM, WD = 0.1, 0.9, 2e-4
RESULTS = Path(__file__).resolve().parent / "results" / "fusion_cpu.md"
SWEEP_RESULTS = RESULTS.with_name("fusion_sweeps.md")


def _data(k: int, device: torch.device, batch: int = BATCH,
          channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(k, batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)
    if channels_last:  # per member: each images[j] is an NHWC-strided batch, as the loader's
        images = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in images])
    labels = torch.randint(0, NUM_CLASSES, (k, batch), generator=generator).to(device)
    return images, labels


def sequential_step(k: int, device: torch.device, batch: int = BATCH, amp: bool = False,
                    channels_last: bool | None = None):
    """K separate models stepped in turn. `amp` (bf16 autocast) is what trainables.pipeline
    does on CUDA; `channels_last` None: the memory format the unfused trial trains 32x32
    images in on `device` (trainables.models.memory_format), so K=1 is its step."""
    if channels_last is None:
        channels_last = memory_format(device, IMAGE_SIZE) == torch.channels_last
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = create_model("resnet32", NUM_CLASSES).to(device).train()
        models.append(model.to(memory_format=torch.channels_last) if channels_last else model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
                  for m in models]
    images, labels = _data(k, device, batch, channels_last)

    def step() -> None:
        for j, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(images[j]), labels[j])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def vmap_step(k: int, device: torch.device, batch: int = BATCH, amp: bool = False):
    """The fused step; `amp` autocasts forward and loss as trainables.fused.runner does (the
    fused path has no channels-last: StackedModel's stacked weights stay contiguous)."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(create_model("resnet32", NUM_CLASSES).to(device))
    stack = StackedModel(models)
    sgd = StackedSGD()
    images, labels = _data(k, device, batch)
    group = SGDGroup(list(stack.params), torch.full((k,), LR, device=device),
                     torch.full((k,), WD, device=device))
    momentum = torch.full((k,), MOMENTUM, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            _, logits = stack.train_forward(images)
            losses = vmap(F.cross_entropy)(logits, labels)
        for tensor in stack.params.values():
            tensor.grad = None
        losses.sum().backward()
        sgd.step(stack.params, [group], momentum)

    return step


class _GroupedBlock(nn.Module):
    def __init__(self, k: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.k, self.cin, self.cout = k, cin, cout
        self.conv1 = nn.Conv2d(k * cin, k * cout, 3, stride, 1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * cout)
        self.conv2 = nn.Conv2d(k * cout, k * cout, 3, 1, 1, bias=False, groups=k)
        self.bn2 = nn.BatchNorm2d(k * cout)
        self.shortcut = stride != 1 or cin != cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut:  # option A per member: subsample, zero-pad each member's channels
            short = x[:, :, ::2, ::2]
            n, _, h, w = short.shape
            pad = (self.cout - self.cin) // 2
            short = F.pad(short.view(n, self.k, self.cin, h, w), (0, 0, 0, 0, pad, pad))
            short = short.reshape(n, self.k * self.cout, h, w)
        else:
            short = x
        return F.relu(out + short)


class GroupedResNet32(nn.Module):
    """K ResNet-32 members as one network of grouped convolutions (HFTA's horizontal fusion)."""

    def __init__(self, k: int, num_classes: int) -> None:
        super().__init__()
        self.k = k
        self.conv1 = nn.Conv2d(k * 3, k * 16, 3, 1, 1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * 16)
        blocks, width = [], 16
        for stage, out in enumerate((16, 32, 64)):
            for block in range(5):
                blocks.append(_GroupedBlock(k, width, out, 2 if stage > 0 and block == 0 else 1))
                width = out
        self.layers = nn.Sequential(*blocks)
        self.weight = nn.Parameter(torch.randn(k, num_classes, 64) * 0.1)
        self.bias = nn.Parameter(torch.zeros(k, 1, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [K, B, 3, H, W] -> [K, B, C]
        k, b = images.shape[:2]
        x = images.transpose(0, 1).reshape(b, k * 3, *images.shape[3:])
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        features = x.mean((2, 3)).view(b, k, 64).transpose(0, 1)
        return torch.baddbmm(self.bias, features, self.weight.transpose(1, 2))


def grouped_step(k: int, device: torch.device, batch: int = BATCH):
    torch.manual_seed(0)
    model = GroupedResNet32(k, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    images, labels = _data(k, device, batch)

    def step() -> None:
        logits = model(images)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        loss = loss.view(k, -1).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


MODES = {"sequential": sequential_step, "vmap": vmap_step, "grouped": grouped_step}


def measure(modes: list[str], k: int, device: torch.device, warmup: int, steps: int,
            repeats: int, batch: int = BATCH, **options: bool) -> dict[str, float]:
    """Median images/s of each mode; the modes take turns within each repeat, so a change of
    machine load during the measurement hits all of them alike. `options` (amp,
    channels_last) go to the step builders."""
    runs = {mode: MODES[mode](k, device, batch, **options) for mode in modes}
    for step in runs.values():
        for _ in range(warmup):
            step()
    if device.type == "cuda":  # the warm-up's queued kernels are not the first repeat's
        torch.cuda.synchronize(device)
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, step in runs.items():
            started = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[mode].append(k * batch * steps / (time.perf_counter() - started))
    return {mode: statistics.median(values) for mode, values in rates.items()}


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _machine(setup: str, load_before: str, protocol: str) -> str:
    """The line under a table: machine, `setup` (closing its parenthesis), load, `protocol`."""
    return (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__}{setup}; load average (1/5/15 min) before "
            f"{load_before}, after {_load()}; {protocol}")


def _write(args: argparse.Namespace, rows: list, device: torch.device, load_before: str,
           elapsed: float) -> None:
    """Print and save the table so far (a run cut short still leaves its rows)."""
    header = ["K", *(f"{mode} img/s" for mode in args.modes)]
    if "sequential" in args.modes:
        header += [f"{mode} / sequential" for mode in args.modes if mode != "sequential"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, rates in rows:
        cells = [str(k), *(f"{rates[mode]:.1f}" for mode in args.modes)]
        if "sequential" in args.modes:
            cells += [f"{rates[mode] / rates['sequential']:.2f}x"
                      for mode in args.modes if mode != "sequential"]
        lines.append("| " + " | ".join(cells) + " |")
    machine = _machine(f", {torch.get_num_threads()} threads), device {device}", load_before,
                       f"{args.warmup} warm-up + {args.steps} timed steps, median of "
                       f"{args.repeats}, modes interleaved; took {elapsed:.0f} s")
    table = "\n".join(lines)
    print(table)
    print(machine, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            "# Fused training throughput (benchmarks/fusion.py)\n\n"
            "Aggregate training images/s of K ResNet-32 members (batch 128 each, CIFAR-shaped "
            "random data, 100 classes): K separate models stepped in turn, in the memory format "
            "an unfused trial trains in here (`sequential`; channels-last on a CPU since "
            "32x32 images are at its threshold), the "
            "fused path of `trainables.fused` (`vmap`), and grouped convolutions (`grouped`).\n\n"
            f"{table}\n\n{machine}\n")


def compare_sweeps(spaces: list[str], fuse: int, repeats: int, out: str) -> None:
    """Unfused and fused sweeps of each space in turn (A B A B ...), so a drift of the machine's
    load hits both alike; a table of medians (and each run) at `out`."""
    load_before, started = _load(), time.perf_counter()
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(repeats):
        for space in spaces:
            for extra in ((), ("--fuse", str(fuse))):
                with tempfile.TemporaryDirectory(prefix="tailtune-fusion-") as folder:
                    row = measure_sweep(space, Path(folder), extra)
                row["load"] = os.getloadavg()[0]
                runs.setdefault((space, row["args"] or "unfused"), []).append(row)
                print(f"run {repeat + 1}: {space} {row['args'] or 'unfused'}: {row['wall_s']} s, "
                      f"outside epochs {row['overhead_share']:.1%}, load {row['load']:.2f}",
                      flush=True)
    lines = ["| space | mode | wall s (median, min-max) | fused / unfused (pairs) | "
             "outside epochs (median) | trials (last run) |", "|---|---|---|---|---|---|"]
    for space in spaces:
        plain, fused = runs[(space, "unfused")], runs[(space, f"--fuse {fuse}")]
        ratios = [f["wall_s"] / p["wall_s"] for p, f in zip(plain, fused, strict=True)]
        for mode, rows in (("unfused", plain), (f"--fuse {fuse}", fused)):
            walls = [r["wall_s"] for r in rows]
            ratio = (f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                     if rows is fused else "")
            lines.append(f"| {space} | {mode} | {statistics.median(walls):.1f} "
                         f"({min(walls):.1f}-{max(walls):.1f}) | {ratio} | "
                         f"{statistics.median(r['overhead_share'] for r in rows):.1%} | "
                         f"{rows[-1]['trials']} |")
    machine = _machine(")", load_before, f"{repeats} runs of each, interleaved; took "
                       f"{time.perf_counter() - started:.0f} s")
    table = "\n".join(lines)
    print(table)
    print(machine, flush=True)
    if out:
        Path(out).write_text(
            "# Default sweeps, fused and unfused (benchmarks/fusion.py --sweeps)\n\n"
            "`python search/run.py --space S` (embedded digits_lt, 8 trials, ASHA) against the "
            f"same with `--fuse {fuse}`. \"outside epochs\": the share of the machine's slot time "
            "(wall x CPUs) not spent in training epochs (benchmarks/sweep_overhead.py).\n\n"
            f"{table}\n\n{machine}\n\nEach run:\n\n"
            + "\n".join(f"- {row['space']} {row['args'] or 'unfused'}: wall {row['wall_s']} s, "
                        f"startup {row['startup_s']} s, epochs {row['epoch_s']} slot-s, outside "
                        f"epochs {row['overhead_share']:.1%}, load {row['load']:.2f}"
                        for rows in runs.values() for row in rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", metavar="SPACE",
                        help="compare whole default sweeps instead (see the module docstring)")
    parser.add_argument("--fuse", type=int, default=8, help="members a fused trial (--sweeps)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS), help="markdown table; '' for none")
    args = parser.parse_args(argv)
    if args.sweeps:
        out = str(SWEEP_RESULTS) if args.out == str(RESULTS) else args.out
        compare_sweeps(args.sweeps, args.fuse, args.repeats, out)
        return 0
    device = torch.device(args.device)
    load_before = _load()
    started = time.perf_counter()
    rows = []
    for k in args.ks:
        rates = measure(args.modes, k, device, args.warmup, args.steps, args.repeats)
        rows.append((k, rates))
        cells = "  ".join(f"{mode} {rate:7.1f}" for mode, rate in rates.items())
        print(f"K={k:<3d} images/s  {cells}", flush=True)
        _write(args, rows, device, load_before, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
