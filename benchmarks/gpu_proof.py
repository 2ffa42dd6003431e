"""GPU proof: one prepared script that shows the GPU pipeline is correct and fast.

It runs the project's own trial pipeline (`trainables.pipeline.run_trial`) with nothing but
PyTorch, torchvision, numpy and the project: Ray, Optuna and MLflow are never imported. Stages,
cheapest first:

  env           device, driver, torch / CUDA / cuDNN versions, every project module importing
  correctness   every method and radius variant, 2 epochs a phase, bf16 autocast, all losses
                finite; the DRO loss under autocast against float32 on the same features; a
                seeded run repeated; a stage 1 handed on through the stage-1 cache
  throughput    device-resident batches against the authors' PIL + DataLoader path (the
                functions of benchmarks/throughput.py), and the same with torch.compile
  packing       K = 1, 2, 4, 8 trial processes sharing the one device, aggregate images/s
  fused         K = 1, 2, 4, 8, 16, 32 ResNet-32 members fused in one model (trainables.fused:
                stacked weights under torch.func.vmap), aggregate training images/s, next to one
                unfused trial's step and the packing stage's K processes (issue 15)
  paper_ce      CIFAR-10-LT IF 100 (JPEG copy), ResNet-32, 200-epoch LDAM-recipe stage 1
  paper_dro_lt  the dro_lt_paper preset (80 DRO + 20 classifier epochs) on that stage 1
  paper_wb      the wb_paper preset: its own stage 1 and stage 2
  fused_sweep   16 dro_lt trials drawn from the dro_lt space, trained fused
                (`trainables.fused.run_trials`, groups of --fuse) on the paper stages' CIFAR-10-LT
                IF 100: wall time, against one unfused trial of the same config x 16

`--stages` takes names, `paper` (the three paper stages) or `all`. Each stage runs in a process
of its own, so a crash or a broken CUDA context stays in that stage, and appends one JSON line to
OUT/gpu_proof.jsonl when it ends; a run cut short keeps what it finished. A table closes the run.

    python benchmarks/gpu_proof.py --out proof --stages env,correctness,throughput,packing
    python benchmarks/gpu_proof.py --out proof --stages paper --data-dir DATA/cifar10-jpg
    python benchmarks/gpu_proof.py --out proof --stages packing,fused
    python benchmarks/gpu_proof.py --out proof --stages fused_sweep --data-dir DATA/cifar10-jpg
    python benchmarks/gpu_proof.py --device cpu --tiny --out /tmp/proof   # the CPU rehearsal

What `fused` measures: the training step alone (benchmarks/fusion.py's `vmap_step` and
`sequential_step`: forward, cross-entropy, backward, SGD on resident random CIFAR-shaped
batches), warm-up steps then timed steps closed by torch.cuda.synchronize, median of repeats.
On CUDA both run under bf16 autocast, as the pipeline does; channels-last is the unfused
path's only (trainables.pipeline sets it, the fused path does not), and the line says so.
The packing figures it sets beside them are whole stage-1 trials (augmentation, validation),
so the two ratios share a denominator only when packing's K=1 is close to the step's rate.

What `fused_sweep` measures: `run_trials` as it is on this branch, where every member trains
its own copy of the shared stage 1 (same seed, same data order: identical copies); the
stage-1 cache is not used by the fused path here, so the wall time includes K stacked stage-1
trainings per group. The unfused figures are one trial's measured wall time x the number of
trials, and (as an unfused sweep sharing its stage 1 through the cache would run) its
stage-1 epochs once plus its other epochs x the number of trials.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import pkgutil
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
# Run as a script from anywhere: the project's packages and the sibling benchmark importable.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SCRIPT.parent))

# Guarded: the GPU machine has only torch, torchvision and numpy, and a module the project needs
# but that machine lacks must become the env stage's result, not a traceback before any line.
try:
    import fusion
    import numpy as np
    import throughput
    import torch
    import torchvision
    from PIL import Image

    import trainables
    from spaces import fixed_settings, get_space
    from trainables.centroids import compute_centroids
    from trainables.config import METHODS, PRESETS, RADII, TrialConfig
    from trainables.data import ArraySplit, LTDataset, register_dataset
    from trainables.datasets.cifar import CIFAR_MEAN, CIFAR_STD
    from trainables.fused import run_trials
    from trainables.losses import dro_loss, make_radii
    from trainables.lt_profile import long_tail_counts
    from trainables.models import create_model
    from trainables.pipeline import resolve_device, run_trial

    IMPORT_ERROR: str | None = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()

STAGES = ("env", "correctness", "throughput", "packing", "fused", "paper_ce", "paper_dro_lt",
          "paper_wb", "fused_sweep")
# Stages with no time limit unless --budget gives one: they take what the recipe takes.
UNLIMITED_STAGES = ("paper_ce", "paper_dro_lt", "paper_wb", "fused_sweep")
ALIASES = {"all": STAGES, "paper": ("paper_ce", "paper_dro_lt", "paper_wb")}
RESULTS_FILE = "gpu_proof.jsonl"
PROGRESS_FILE = "progress.jsonl"
# Never on the GPU path: the GPU machine does not have them (sklearn only serves digits_lt).
FORBIDDEN = ("ray", "optuna", "mlflow", "sklearn")
# The Ray Tune adapter is the one project module whose job needs Ray; the proof never imports it.
NOT_ON_GPU_PATH = ("tune",)
STATUS_PASSED = "passed"
PHASE_EPOCH_FIELDS = {"stage1": "epochs", "dro": "dro_epochs", "classifier": "cls_epochs"}
STAGE1_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule",
                 "warmup_epochs")
DRO_REL_ERROR_BOUND = 1e-2
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# LDAM paper (Cao et al., 2019), official CIFAR-10 pickles, ResNet-32, CIFAR-10-LT IF 100, top-1.
PUBLISHED = {"ce": ("cross-entropy", 70.36), "ldam_drw": ("LDAM-DRW", 77.03)}
SYNTHETIC_NAME = "gpu_proof_cifar10_lt_shaped"
# Seconds a stage needs at least before it is worth starting under --budget.
MIN_STAGE_SECONDS = 5.0
# A stage process still alive this long after the budget ran out is killed.
BUDGET_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the real proof, or --tiny for the CPU rehearsal."""

    # correctness: CIFAR-10-LT-shaped synthetic data
    n_max: int
    imbalance: float
    val_per_class: int
    test_per_class: int
    batch_size: int
    # throughput: CIFAR-100-LT-shaped synthetic data (benchmarks/throughput.py)
    images: int
    steps: int
    warmup: int
    compiled_warmup: int
    workers: int
    compile_timeout: float
    # packing
    packing_images: int
    packing_epochs: int
    packing_timeout: float
    # fused: steps per K, and per repeat
    fused_batch: int
    fused_warmup: int
    fused_steps: int
    fused_repeats: int
    # fused_sweep: trials drawn from the dro_lt space; total epochs (None: the cifar plan);
    # data settings over the paper stages' (None: theirs)
    sweep_trials: int
    sweep_epochs: int | None
    sweep_data: dict[str, Any] | None
    # paper: None keeps the real recipe
    paper_imbalance: float
    paper_overrides: dict[str, dict[str, Any]] | None
    stage_timeout: float


FULL = Sizes(
    n_max=500, imbalance=100.0, val_per_class=20, test_per_class=50, batch_size=128,
    # 85 full batches of 128: every batch has one shape, so a compiled model compiles once
    images=85 * 128, steps=300, warmup=30, compiled_warmup=50, workers=8, compile_timeout=240.0,
    packing_images=10_847, packing_epochs=4, packing_timeout=300.0,
    fused_batch=128, fused_warmup=10, fused_steps=30, fused_repeats=3,
    sweep_trials=16, sweep_epochs=None, sweep_data=None,
    paper_imbalance=100.0, paper_overrides=None, stage_timeout=600.0,
)
TINY = Sizes(
    n_max=8, imbalance=4.0, val_per_class=1, test_per_class=1, batch_size=16,
    images=4 * 16, steps=3, warmup=1, compiled_warmup=2, workers=2, compile_timeout=120.0,
    packing_images=32, packing_epochs=2, packing_timeout=120.0,
    # batch 8 on the CPU: the rehearsal proves the plumbing, not the rate
    fused_batch=8, fused_warmup=1, fused_steps=1, fused_repeats=1,
    # 3 trials in groups of 2 (--fuse 2): a full group and a part one, an epoch a phase
    sweep_trials=3, sweep_epochs=3, sweep_data={"n_max": 8, "imbalance": 4.0, "val_per_class": 1},
    paper_imbalance=10.0,
    paper_overrides={
        "data": {"n_max": 20, "val_per_class": 5},
        "ce": {"epochs": 3},
        "dro_lt": {"epochs": 3, "dro_epochs": 2, "cls_epochs": 2},
        "wb": {"epochs": 3, "cls_epochs": 2},
    },
    stage_timeout=240.0,
)


class OutOfTime(Exception):
    """Raised from an epoch callback when --budget is spent: the stage ends and says so."""


# ==================================================================== output
def append_line(path: Path, record: dict[str, Any], sync: bool = True) -> None:
    """One JSON line, flushed (and by default synced) at once: a run killed later keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill mid-write
            records.append(json.loads(line))
    return records


def forbidden_loaded() -> list[str]:
    return sorted(name for name in FORBIDDEN if name in sys.modules)


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


# ==================================================================== processes
def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None):
    """A process in its own group (so its DataLoader or compiler workers die with it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller through finish()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(process: subprocess.Popen) -> None:
    process.log.close()  # type: ignore[attr-defined]


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_echoed(command: list[str], timeout: float | None, log_path: Path, prefix: str,
               env: dict[str, str] | None = None) -> int | None:
    """Run a stage process, echoing its output (prefixed) and logging it; None on a timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, env=env, start_new_session=True)

        def pump() -> None:
            for line in process.stdout:
                log.write(line)
                log.flush()
                print(prefix + line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            code = None
        reader.join(timeout=10)
    return code


def seconds_left(args: argparse.Namespace) -> float:
    """Seconds until --budget runs out (infinite without one)."""
    return math.inf if args.deadline is None else args.deadline - time.time()


# ==================================================================== data
def synthetic_cifar10_lt(sizes: Sizes, seed: int = 0) -> LTDataset:
    """CIFAR-10-LT-shaped uint8 images: a fixed random pattern per class plus noise.

    Learnable on purpose: accuracy above chance after a few epochs shows the device path trains.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = long_tail_counts(sizes.n_max, 10, sizes.imbalance)
    patterns = torch.randint(0, 256, (10, 3, 32, 32), generator=generator)

    def split(per_class: list[int]) -> ArraySplit:
        labels = torch.repeat_interleave(torch.arange(10), torch.tensor(per_class))
        noise = torch.randint(0, 256, (labels.numel(), 3, 32, 32), generator=generator)
        return ArraySplit(((patterns[labels] + noise) // 2).to(torch.uint8), labels)

    return LTDataset(
        name=SYNTHETIC_NAME,
        num_classes=10,
        class_counts=list(counts),
        protocol="holdout",
        splits={
            "train": split(list(counts)),
            "val": split([sizes.val_per_class] * 10),
            "test": split([sizes.test_per_class] * 10),
        },
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        crop_padding=4,
        flip=True,
        image_size=32,
        default_model="resnet32",
        info={"synthetic": True, "imbalance": sizes.imbalance},
    )


def make_tiny_jpeg_tree(root: Path, train: int = 30, test: int = 10) -> Path:
    """A CIFAR-10-layout JPEG tree (train/<class>/, test/<class>/) of 32x32 images, made once."""
    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(0)
    building = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    for name in CIFAR10_CLASSES:
        colour = rng.integers(0, 256, 3)
        for split, count in (("train", train), ("test", test)):
            folder = building / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:04d}.jpg",
                                                              quality=75)
    # renamed into place whole: a run killed while writing leaves no half tree behind
    os.replace(building, root)
    return root


# ==================================================================== trials
def two_epochs_a_phase(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every phase it runs cut to 2 epochs."""
    config = dict(config)
    for phase, _ in TrialConfig.from_dict(config).phase_plan():
        if phase in PHASE_EPOCH_FIELDS:
            config[PHASE_EPOCH_FIELDS[phase]] = 2
    return config


def trial_summary(result: dict[str, Any]) -> dict[str, Any]:
    history = result["history"]
    losses: dict[str, list[float]] = {}
    for row in history:
        losses.setdefault(row["phase"], []).append(row["train_loss"])
    radii = result["diagnostics"].get("radii")
    values = [row["train_loss"] for row in history]
    values += [result[split][key] for split in ("val", "test") for key in ("all",)]
    values += list(radii or [])
    values += result["diagnostics"]["weight_norms"]["final"]
    return {
        "status": result["status"],
        "epochs": {phase: len(rows) for phase, rows in losses.items()},
        "losses": losses,
        "val_all": result["val"]["all"],
        "test_all": result["test"]["all"],
        "radii_range": [min(radii), max(radii)] if radii else None,
        "maxnorm_radius": result["diagnostics"].get("maxnorm_radius"),
        "finite": result["status"] == "completed" and all(finite(v) for v in values),
    }


def guarded(function: Callable, *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """(value, None), or (None, the error and where it came from) if `function` raised."""
    try:
        return function(*args, **kwargs), None
    except Exception as error:  # the caller records it and goes on with the next check
        return None, f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"


def fingerprint(result: dict[str, Any]) -> dict[str, Any]:
    """Everything a seeded repeat must reproduce exactly."""
    return {
        "history": [
            [row["phase"], row["train_loss"], row["val_all"], row.get("ncm_all")]
            for row in result["history"]
        ],
        "val": result["val"]["per_class"],
        "test": result["test"]["per_class"],
        "radii": result["diagnostics"].get("radii"),
        "norms": result["diagnostics"]["weight_norms"]["final"],
    }


def max_difference(first: Any, second: Any) -> float:
    """Largest absolute difference between two equally shaped nests of numbers."""
    if isinstance(first, list | tuple):
        if not isinstance(second, list | tuple) or len(first) != len(second):
            return math.inf
        return max((max_difference(a, b) for a, b in zip(first, second, strict=True)),
                   default=0.0)
    if finite(first) and finite(second):
        return abs(float(first) - float(second))
    return 0.0 if first == second else math.inf


def epoch_recorder(stage: str, out: Path, run_id: str, deadline: float | None,
                   print_every: int) -> tuple[Callable, list[dict[str, Any]]]:
    """An on_epoch callback that keeps compact rows, logs progress and enforces the budget."""
    rows: list[dict[str, Any]] = []

    def on_epoch(metrics: dict[str, Any], _snapshot: Callable) -> None:
        row = {
            "epoch": metrics["epoch"],
            "phase": metrics["phase"],
            "phase_epoch": metrics["phase_epoch"],
            "train_loss": metrics["train_loss"],
            "val_all": metrics["val_all"],
            "epoch_seconds": metrics.get("epoch_seconds", 0.0),
            "train_seconds": metrics["train_seconds"],
            "images_per_second": metrics["images_per_second"],
            "replayed": metrics.get("replayed", False),
            "at": time.time(),
        }
        rows.append(row)
        # not synced: a disk sync every epoch would lengthen the run it measures
        append_line(out / PROGRESS_FILE, {"run": run_id, "stage": stage, **row}, sync=False)
        if not row["replayed"] and (row["phase_epoch"] == 1 or
                                    row["phase_epoch"] % print_every == 0):
            print(f"  {stage} {row['phase']} epoch {row['phase_epoch']}: loss "
                  f"{row['train_loss']:.4f}, val {percent(row['val_all'])}%, "
                  f"{row['images_per_second']:.0f} img/s, {row['epoch_seconds']:.2f} s",
                  flush=True)
        if deadline is not None and time.time() > deadline:
            raise OutOfTime(f"budget spent after {stage} {row['phase']} epoch "
                            f"{row['phase_epoch']}")

    return on_epoch, rows


def phase_timing(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per phase: epochs trained here, training seconds, wall seconds (training + validation)."""
    timing: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["replayed"]:
            continue
        entry = timing.setdefault(row["phase"], {"epochs": 0, "train_seconds": 0.0,
                                                 "wall_seconds": 0.0, "images_per_second": []})
        entry["epochs"] += 1
        entry["train_seconds"] += row["train_seconds"]
        entry["wall_seconds"] += row["epoch_seconds"]
        entry["images_per_second"].append(row["images_per_second"])
    for entry in timing.values():
        rates = entry.pop("images_per_second")
        entry["median_images_per_second"] = statistics.median(rates) if rates else 0.0
    return timing


# ==================================================================== stage: env
def stage_env(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "project_commit": _git_commit(),
    }
    if IMPORT_ERROR is not None:
        result["import_error"] = IMPORT_ERROR
        return {"result": result, "checks": {"project_imports": False},
                "headline": "import failed: " + IMPORT_ERROR.strip().splitlines()[-1]}
    result.update(torch=torch.__version__, torchvision=torchvision.__version__,
                  numpy=np.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                  else None)
    modules = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(trainables.__path__)):
        if module in NOT_ON_GPU_PATH:
            continue
        try:
            importlib.import_module(f"trainables.{module}")
            modules[module] = "ok"
        except Exception as error:  # recorded: a module that fails here fails on the GPU path
            modules[module] = f"{type(error).__name__}: {error}"
    result["project_modules"] = modules
    checks = {
        "project_imports": all(value == "ok" for value in modules.values()),
        "no_forbidden_modules": not forbidden_loaded(),
    }
    device = resolve_device(args.device)
    result["machine"] = throughput.machine_info(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
            "devices_visible": torch.cuda.device_count(),
        }
        result["nvidia_smi"] = _nvidia_smi()
        checks["bf16_supported"] = bool(result["gpu"]["bf16"])
    # one autocast convolution on the device: the dtype the pipeline's steps will run in
    conv = torch.nn.Conv2d(3, 8, 3).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = conv(torch.randn(2, 3, 8, 8, device=device))
    result["autocast_dtype"] = str(out.dtype)
    checks["bf16_autocast"] = out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    name = result.get("gpu", {}).get("name", result["machine"]["device_name"])
    driver = (result.get("nvidia_smi") or {}).get("driver_version", "-")
    broken = [m for m, value in modules.items() if value != "ok"]
    headline = (f"{name}, driver {driver}, torch {torch.__version__}, CUDA {torch.version.cuda}"
                + (f"; modules failing: {', '.join(broken)}" if broken else ""))
    return {"result": result, "checks": checks, "headline": headline}


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _nvidia_smi() -> dict[str, str] | None:
    fields = ("name", "driver_version", "memory.total", "compute_mode", "clocks.max.sm",
              "power.limit", "mig.mode.current")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        if done.returncode == 0 and done.stdout.strip():
            values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
            return dict(zip(fields, values, strict=False))
    return None


# ==================================================================== stage: correctness
def correctness_variants(base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every method (dro_lt with every radius) and each paper preset, 2 epochs a phase."""
    variants = []
    for method in METHODS:
        for radius in RADII if method == "dro_lt" else (None,):
            config = {**base, "method": method, **({"radius": radius} if radius else {})}
            variants.append((f"{method}/{radius}" if radius else method, config))
    for preset, values in PRESETS.items():
        variants.append((f"preset:{preset}", {**values, **base}))
    return [(name, two_epochs_a_phase(config)) for name, config in variants]


def stage_correctness(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    device = resolve_device(args.device)
    dataset = synthetic_cifar10_lt(sizes)
    register_dataset(SYNTHETIC_NAME, scale="cifar", n_max=None,
                     default_model="resnet32")(lambda **_: dataset)
    batch = sizes.batch_size
    base = {"dataset": SYNTHETIC_NAME, "model": "resnet32", "device": device.type, "seed": 0,
            "batch_size": batch, "dro_batch_size": batch, "cls_batch_size": batch, "amp": True}
    variants = dict(correctness_variants(base))
    runs, results = {}, {}
    for name, config in variants.items():
        started = time.perf_counter()
        result, error = guarded(run_trial, config)
        if error is None:
            results[name] = result
            runs[name] = trial_summary(result)
        else:  # one variant's failure must not hide the others' results
            runs[name] = {"status": "error", "error": error, "finite": False}
        runs[name]["seconds"] = time.perf_counter() - started
        print(f"  {name}: {runs[name]['status']}, losses finite {runs[name]['finite']}, "
              f"test {percent(runs[name].get('test_all'))}%", flush=True)

    dro, dro_error = guarded(dro_autocast_check, device, dataset, batch)
    if "dro_lt/learned" in results:
        repeat, repeat_error = guarded(repeat_check, device, results["dro_lt/learned"],
                                       variants["dro_lt/learned"])
    else:
        repeat, repeat_error = None, "the dro_lt/learned run failed: nothing to repeat"
    cache, cache_error = guarded(cache_check, base, args.out)
    checks = {
        "all_variants_finite": all(run["finite"] for run in runs.values()),
        "dro_autocast_rel_error": dro is not None
        and all(row["passed"] for row in dro["radii"].values()),
        "repeat_identical": repeat is not None and repeat["identical"],
        "stage1_cache_reused": cache is not None and cache["passed"],
    }
    worst = max(row["rel_error_bf16_features"] for row in dro["radii"].values()) if dro else None
    headline = "; ".join([
        f"{sum(r['finite'] for r in runs.values())}/{len(runs)} runs finite",
        f"DRO bf16 rel err {worst:.1e} (< {DRO_REL_ERROR_BOUND:g})" if dro else "DRO check error",
        "repeat error" if repeat is None else "repeat identical" if repeat["identical"]
        else f"repeat differs (max {repeat['max_difference']:.2e})",
        "cache error" if cache is None else "cache reused" if cache["passed"]
        else "cache NOT reused",
    ])
    return {
        "result": {
            "autocast": device.type == "cuda",
            "dataset": dataset.describe() | {"class_counts": dataset.class_counts},
            "runs": runs,
            "dro_loss_autocast": dro or {"error": dro_error},
            "repeat": repeat or {"error": repeat_error},
            "stage1_cache": cache or {"error": cache_error},
        },
        "checks": checks,
        "headline": headline,
    }


def dro_autocast_check(device: torch.device, dataset: LTDataset, batch: int) -> dict[str, Any]:
    """L_DRO under bf16 autocast against float32, on the same batch of ResNet-32 features."""
    torch.manual_seed(0)
    model = create_model("resnet32", dataset.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    centroids = compute_centroids(
        model, dataset.loader("train", batch_size=512, device=device), dataset.num_classes,
        model.feature_dim, device,
    )
    images, labels = next(iter(dataset.loader("train", batch_size=batch, device=device,
                                               augment=True, shuffle=True, seed=0)))
    with torch.no_grad():
        features = model.features(images).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features_amp = model.features(images)

    def rel(value: torch.Tensor, reference: torch.Tensor) -> float:
        return float((value.float() - reference).norm() / reference.norm().clamp_min(1e-30))

    rows = {}
    for variant in RADII:
        radii = make_radii(variant, 1.0, dataset.class_counts).to(device)().detach()
        leaf = features.clone().requires_grad_(True)
        reference = dro_loss(leaf, labels, centroids, radii)
        (grad_reference,) = torch.autograd.grad(reference, leaf)
        rounded_leaf = features.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            # what the model hands the loss under autocast: the same features, in bf16
            same = dro_loss(features, labels, centroids, radii)
            rounded = dro_loss(rounded_leaf.to(torch.bfloat16), labels, centroids, radii)
            end_to_end = dro_loss(features_amp, labels, centroids, radii)
        (grad_rounded,) = torch.autograd.grad(rounded, rounded_leaf)
        row = {
            "float32": reference.item(),
            "autocast_same_features": float(same),
            "autocast_bf16_features": float(rounded),
            "rel_error_same_features": rel(same, reference.detach()),
            "rel_error_bf16_features": rel(rounded, reference.detach()),
            "rel_error_grad_bf16_features": rel(grad_rounded, grad_reference),
            # informative only: the features themselves come from bf16 convolutions here
            "rel_error_end_to_end": rel(end_to_end, reference.detach()),
        }
        row["passed"] = all(finite(row[key]) for key in row) and max(
            row["rel_error_same_features"], row["rel_error_bf16_features"]
        ) < DRO_REL_ERROR_BOUND
        rows[variant] = row
    return {"bound": DRO_REL_ERROR_BOUND, "batch": int(labels.numel()), "temperature": 1.0,
            "eps": 1.0, "radii": rows}


def repeat_check(device: torch.device, first: dict[str, Any],
                 config: dict[str, Any]) -> dict[str, Any]:
    """The same seeded trial again: every loss, accuracy, radius and norm must match exactly."""
    second = run_trial(config)
    report: dict[str, Any] = {
        "config": config["method"] + "/" + config["radius"],
        "identical": fingerprint(first) == fingerprint(second),
        "max_difference": max_difference(fingerprint(first), fingerprint(second)),
    }
    if not report["identical"] and device.type == "cuda":
        # Diagnosis: the same pair with deterministic kernels, and which ops warned they are not
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                third, fourth = run_trial(config), run_trial(config)
            finally:
                torch.use_deterministic_algorithms(False)
        report["deterministic_mode_identical"] = fingerprint(third) == fingerprint(fourth)
        report["deterministic_mode_max_difference"] = max_difference(fingerprint(third),
                                                                     fingerprint(fourth))
        report["nondeterministic_ops"] = sorted({
            str(w.message).strip().splitlines()[0][:200] for w in caught
            if "determinis" in str(w.message)
        })
    return report


def cache_check(base: dict[str, Any], out: str) -> dict[str, Any]:
    """A stage 1 trained by one trial, stored, and loaded onto the device by another."""
    with tempfile.TemporaryDirectory(dir=out, prefix="stage1-cache-check-") as cache_dir:
        stage1 = run_trial(two_epochs_a_phase({**base, "method": "ce"}), cache_dir=cache_dir)
        reused = run_trial(two_epochs_a_phase({**base, "method": "dro_lt"}), cache_dir=cache_dir)
    replayed = [row.get("replayed", False) for row in reused["history"]
                if row["phase"] == "stage1"]
    norms_after_stage1 = stage1["diagnostics"]["weight_norms"]["final"]
    norms_loaded = reused["diagnostics"]["weight_norms"]["stage1"]
    report = {
        "stage1_epochs_replayed": sum(replayed),
        "loaded_weights_match": norms_after_stage1 == norms_loaded,
        "reused_finite": trial_summary(reused)["finite"],
    }
    report["passed"] = bool(replayed) and all(replayed) and report["loaded_weights_match"] \
        and report["reused_finite"]
    return report


# ==================================================================== stage: throughput
def compiler(mode: str | None, backend: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """The `wrap` for throughput.measure(): the same model, compiled."""
    options = {"mode": mode} if backend == "inductor" and mode else {}
    return lambda model: torch.compile(model, backend=backend, dynamic=False, **options)


def stage_throughput(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    device = resolve_device(args.device)
    dataset = throughput.synthetic_cifar_lt(sizes.images)
    batches = dataset.loader("train", batch_size=sizes.batch_size, device=device, augment=True,
                             sampler="instance", shuffle=True)
    resident = throughput.measure(batches, device, sizes.steps, sizes.warmup)
    print(f"  device-resident: {resident.images_per_second:.0f} img/s", flush=True)
    reference = throughput.measure(
        throughput.reference_batches(dataset, sizes.batch_size, device, sizes.workers),
        device, sizes.steps, sizes.warmup,
    )
    print(f"  reference ({sizes.workers} workers): {reference.images_per_second:.0f} img/s",
          flush=True)
    ratio = resident.images_per_second / reference.images_per_second
    backend = "eager" if args.tiny else "inductor"
    modes = [m for m in args.compile_modes.split(",") if m and m != "none"]
    if args.tiny:
        modes = modes[:1]  # the rehearsal only proves the plumbing: one mode, Dynamo alone
    compiled = []
    for mode in modes:
        if seconds_left(args) < MIN_STAGE_SECONDS:
            compiled.append({"mode": mode, "backend": backend, "status": "skipped",
                             "error": "budget spent"})
            continue
        entry = run_compile_worker(args, sizes, mode, backend)
        if entry.get("status") == "ok":
            entry["ratio_vs_reference"] = entry["images_per_s"] / reference.images_per_second
            entry["speedup_vs_eager"] = entry["images_per_s"] / resident.images_per_second
        compiled.append(entry)
        print(f"  torch.compile {backend}/{mode}: {entry.get('status')} "
              f"{entry.get('images_per_s', 0):.0f} img/s", flush=True)
    goals = {"ratio_at_least_10x": ratio >= 10} if device.type == "cuda" else {}
    best = max((c for c in compiled if c.get("status") == "ok"),
               key=lambda c: c["images_per_s"], default=None)
    headline = (f"resident {resident.images_per_second:.0f} img/s, reference "
                f"{reference.images_per_second:.0f} img/s, ratio {ratio:.2f}x"
                + (f"; compiled ({best['mode']}) {best['images_per_s']:.0f} img/s" if best else
                   "; compile: " + ", ".join(f"{c['mode']} {c.get('status')}" for c in compiled)
                   if compiled else ""))
    return {
        "result": {
            "images": sizes.images, "batch_size": sizes.batch_size, "steps": sizes.steps,
            "warmup": sizes.warmup, "workers": sizes.workers,
            "device_resident_images_per_s": resident.images_per_second,
            "reference_images_per_s": reference.images_per_second,
            "ratio": ratio,
            "compiled": compiled,
            "machine": throughput.machine_info(device),
        },
        "checks": {"rates_positive": resident.images_per_second > 0
                   and reference.images_per_second > 0},
        "goals": goals,
        "headline": headline,
    }


def run_compile_worker(args: argparse.Namespace, sizes: Sizes, mode: str,
                       backend: str) -> dict[str, Any]:
    """The compiled measurement in a process of its own: a compiler crash or hang is a result."""
    out = Path(args.out)
    result_file = out / "work" / f"compile-{args.run_id}-{mode}.json"
    log = out / "logs" / f"{args.run_id}-compile-{mode}.log"
    process = spawn(child_command(args, "compile_worker", "--compile-mode", mode,
                                  "--compile-backend", backend, "--result", str(result_file)),
                    log)
    entry: dict[str, Any] = {"mode": mode, "backend": backend}
    timeout = min(sizes.compile_timeout, seconds_left(args))
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        entry.update(status="timeout", error=f"no result within {timeout:.0f} s",
                     log_tail=log_tail(log))
        return entry
    finally:
        finish(process)
    if result_file.exists():
        entry.update(json.loads(result_file.read_text()))
    else:
        entry.update(status="error", error=f"exit {process.returncode} without a result",
                     log_tail=log_tail(log))
    return entry


def compile_worker(args: argparse.Namespace, sizes: Sizes) -> int:
    record: dict[str, Any] = {"forbidden_modules_loaded": forbidden_loaded()}
    try:
        device = resolve_device(args.device)
        dataset = throughput.synthetic_cifar_lt(sizes.images)
        batches = dataset.loader("train", batch_size=sizes.batch_size, device=device,
                                 augment=True, sampler="instance", shuffle=True)
        started = time.perf_counter()
        stats = throughput.measure(batches, device, sizes.steps, sizes.compiled_warmup,
                                   wrap=compiler(args.compile_mode, args.compile_backend))
        record.update(
            status="ok",
            images_per_s=stats.images_per_second,
            measured_seconds=stats.seconds,
            compile_and_warmup_seconds=time.perf_counter() - started - stats.seconds,
            warmup_steps=sizes.compiled_warmup,
        )
    except Exception as error:  # a compiler failure is what this worker reports
        record.update(status="error", error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    record["forbidden_modules_loaded"] = forbidden_loaded()
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(record, default=str))
    return 0


# ==================================================================== stage: packing
def stage_packing(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    out = Path(args.out)
    rows = []
    for k in [int(k) for k in args.packing_k.split(",") if k]:
        if seconds_left(args) < MIN_STAGE_SECONDS:
            rows.append({"k": k, "status": "skipped", "error": "budget spent"})
            continue
        rows.append(pack(args, sizes, out, k))
        row = rows[-1]
        print(f"  K={k}: {row['status']}, aggregate {row.get('aggregate_images_per_s', 0):.0f}"
              " img/s", flush=True)
    single = next((r for r in rows if r["k"] == 1 and r["status"] == "ok"), None)
    for row in rows:
        if single and row["status"] == "ok":
            row["speedup_vs_k1"] = row["aggregate_images_per_s"] / single["aggregate_images_per_s"]
    fused = "measured by the fused stage (trainables.fused.run_trials), which reads this line"
    headline = ", ".join(
        f"K={r['k']} {r['aggregate_images_per_s']:.0f}" if r["status"] == "ok"
        else f"K={r['k']} {r['status']}" for r in rows
    ) + " img/s aggregate"
    return {
        "result": {"packing": rows, "fused": fused, "epochs_per_trial": sizes.packing_epochs,
                   "images_per_trial_epoch": None if not rows else rows[0].get("train_images"),
                   "omp_threads_per_trial": 1},
        "checks": {"every_k_ran": all(r["status"] == "ok" for r in rows),
                   "workers_clean": all(not r.get("forbidden_modules_loaded") for r in rows)},
        "headline": headline,
    }


def pack(args: argparse.Namespace, sizes: Sizes, out: Path, k: int) -> dict[str, Any]:
    """K stage-1 trial processes on one device, started together once all are warm."""
    sync = Path(tempfile.mkdtemp(dir=out / "work", prefix=f"packing-{args.run_id}-k{k}-"))
    # As Ray gives a 1-CPU trial: one intra-op thread per trial process.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        spawn(child_command(args, "packing_worker", "--index", str(i), "--sync-dir", str(sync)),
              out / "logs" / f"{args.run_id}-packing-k{k}-{i}.log", env)
        for i in range(k)
    ]
    row: dict[str, Any] = {"k": k}
    timeout = min(sizes.packing_timeout, seconds_left(args))
    try:
        deadline = time.monotonic() + timeout
        while sum((sync / f"ready-{i}").exists() for i in range(k)) < k:
            dead = [w for w in workers if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                row.update(status="error", error="a trial process ended before it was ready"
                           if dead else "trial processes not ready in time")
                return row
            time.sleep(0.01)
        (sync / "go").touch()
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        row.update(status="timeout", error=f"not done within {timeout:.0f} s")
        return row
    finally:
        for worker in workers:
            if worker.poll() is None:
                kill_group(worker)
            finish(worker)
        if "status" in row:
            row["log_tail"] = log_tail(out / "logs" / f"{args.run_id}-packing-k{k}-0.log")
    trials = []
    for i in range(k):
        path = sync / f"result-{i}.json"
        if not path.exists():
            row.update(status="error", error=f"trial process {i} wrote no result",
                       log_tail=log_tail(out / "logs" / f"{args.run_id}-packing-k{k}-{i}.log"))
            return row
        trials.append(json.loads(path.read_text()))
    shutil.rmtree(sync, ignore_errors=True)
    window = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    images = sum(t["images"] for t in trials)
    row.update(
        status="ok" if all(t["status"] == "completed" for t in trials) else "error",
        window_seconds=window,
        images=images,
        train_images=trials[0]["train_images"],
        aggregate_images_per_s=images / window,
        per_trial_images_per_s=[t["images"] / (t["end"] - t["start"]) for t in trials],
        forbidden_modules_loaded=sorted({m for t in trials for m in t["forbidden"]}),
    )
    return row


def packing_worker(args: argparse.Namespace, sizes: Sizes) -> int:
    """One trial process: warm up, wait for the others, then a timed stage-1 training."""
    sync = Path(args.sync_dir)
    device = resolve_device(args.device)
    dataset = throughput.synthetic_cifar_lt(sizes.packing_images)
    register_dataset(throughput.SYNTHETIC_NAME, scale="cifar", n_max=None,
                     default_model="resnet32")(lambda **_: dataset)
    config = {"dataset": throughput.SYNTHETIC_NAME, "model": "resnet32", "device": device.type,
              "method": "ce", "classifier": "none", "batch_size": sizes.batch_size, "epochs": 1}
    run_trial(config)  # CUDA context, cuDNN autotuning, data on the device: not timed
    (sync / f"ready-{args.index}").touch()
    give_up = time.monotonic() + sizes.packing_timeout
    while not (sync / "go").exists():
        # its own process group outlives a killed stage process: never wait forever
        if time.monotonic() > give_up:
            return 1
        time.sleep(0.005)
    start = time.time()
    ends: list[float] = []
    result = run_trial({**config, "epochs": sizes.packing_epochs},
                       lambda metrics, _: ends.append(time.time()))
    train = dataset.split_size("train")
    (sync / f"result-{args.index}.json").write_text(json.dumps({
        "start": start, "end": ends[-1], "images": train * len(ends), "train_images": train,
        "status": result["status"], "forbidden": forbidden_loaded(),
    }))
    return 0


# ==================================================================== stage: fused
def stage_fused(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """Aggregate training images/s of K fused members, against one unfused trial's step."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as trainables.pipeline does on CUDA
    # What each path does on this device: the pipeline autocasts (and goes channels-last)
    # only on CUDA; the fused runner autocasts on CUDA and never goes channels-last.
    unfused_options = {"amp": cuda, "channels_last": cuda}
    fused_options = {"amp": cuda}
    timing = (sizes.fused_warmup, sizes.fused_steps, sizes.fused_repeats)
    single = fusion.measure(["sequential"], 1, device, *timing, batch=sizes.fused_batch,
                            **unfused_options)["sequential"]
    print(f"  one trial alone (unfused step): {single:.1f} img/s", flush=True)
    if cuda:  # each K's peak memory is its own
        torch.cuda.reset_peak_memory_stats(device)
    rows: list[dict[str, Any]] = []
    for k in [int(k) for k in args.fused_ks.split(",") if k]:
        if seconds_left(args) < MIN_STAGE_SECONDS:
            rows.append({"k": k, "status": "skipped", "error": "budget spent"})
            continue
        try:
            rate = fusion.measure(["vmap"], k, device, *timing, batch=sizes.fused_batch,
                                  **fused_options)["vmap"]
        except torch.cuda.OutOfMemoryError as error:
            # a larger K needs more memory still: the largest K that fits is the answer
            rows.append({"k": k, "status": "out_of_memory", "error": str(error)[:500]})
            print(f"  K={k}: CUDA out of memory; larger K not tried", flush=True)
            break
        finally:
            if cuda:
                torch.cuda.empty_cache()
        row = {"k": k, "status": "ok", "aggregate_images_per_s": rate,
               "ratio_vs_one_trial": rate / single}
        if cuda:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(row)
        print(f"  K={k} fused: {rate:.1f} img/s aggregate, {rate / single:.2f}x one trial",
              flush=True)
    packing = _packing_line(Path(args.out), args.run_id)
    if packing is not None:
        for row in packing["rows"]:
            if row.get("status") == "ok":
                row["ratio_vs_one_trial"] = row["aggregate_images_per_s"] / single
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["aggregate_images_per_s"], default=None)
    goals = {"best_k_at_least_8x_one_trial": best is not None and best["ratio_vs_one_trial"] >= 8
             } if cuda and not args.tiny else {}
    headline = (f"one trial {single:.0f} img/s; fused "
                + ", ".join(f"K={r['k']} {r['aggregate_images_per_s']:.0f}" if r["status"] == "ok"
                            else f"K={r['k']} {r['status']}" for r in rows)
                + (f"; best K={best['k']} {best['ratio_vs_one_trial']:.2f}x one trial"
                   if best else "")
                + ("; packing: " + ", ".join(
                    f"K={r['k']} {r['ratio_vs_one_trial']:.2f}x" for r in packing["rows"]
                    if "ratio_vs_one_trial" in r) if packing else "; packing not measured"))
    return {
        "result": {
            "batch_per_member": sizes.fused_batch, "warmup_steps": sizes.fused_warmup,
            "timed_steps": sizes.fused_steps, "repeats": sizes.fused_repeats,
            "one_trial_images_per_s": single,
            "unfused_path": unfused_options, "fused_path": {**fused_options,
                                                            "channels_last": False},
            "fused": rows,
            "packing": packing or "not measured (no packing line in this --out)",
            "machine": throughput.machine_info(device),
        },
        "checks": {"one_trial_rate_positive": single > 0, "fused_k_ran": bool(ok),
                   # an out-of-memory K ends the list: it is a result, not a failure
                   "no_failed_k": all(r["status"] in ("ok", "out_of_memory", "skipped")
                                      for r in rows)},
        "goals": goals,
        "headline": headline,
    }


def _packing_line(out: Path, run_id: str) -> dict[str, Any] | None:
    """The packing stage's figures from this --out: this run's line, else the latest one."""
    lines = [r for r in read_lines(out / RESULTS_FILE)
             if r.get("stage") == "packing" and r.get("status") == STATUS_PASSED]
    line = next((r for r in lines if r.get("run") == run_id), lines[-1] if lines else None)
    if line is None:
        return None
    rows = [{key: row.get(key) for key in ("k", "status", "aggregate_images_per_s")}
            for row in line["result"]["packing"]]
    return {"run": line["run"], "same_run": line["run"] == run_id, "rows": rows,
            "what": f"K stage-1 trial processes, {line['result']['epochs_per_trial']} epochs "
                    "each: whole epochs (augmentation, validation), not the bare step"}


# ==================================================================== stages: paper
def paper_setup(args: argparse.Namespace, sizes: Sizes) -> tuple[dict[str, Any], Path]:
    """The CIFAR-10-LT data settings every paper stage shares, and their stage-1 cache folder."""
    out = Path(args.out)
    if args.tiny:
        root = make_tiny_jpeg_tree(out / "tiny-cifar10-jpg")
    elif args.data_dir is None:
        raise ValueError("the paper stages need --data-dir: the extracted CIFAR-10 JPEG tree "
                         "(train/<class>/*.jpg, test/<class>/*.jpg)")
    else:
        root = Path(args.data_dir).expanduser().resolve()
    data = {"dataset": "cifar10_lt", "data_dir": str(root), "imbalance": sizes.paper_imbalance,
            "protocol": args.protocol, "model": "resnet32", "seed": 0,
            "device": resolve_device(args.device).type}
    if sizes.paper_overrides:
        data.update(sizes.paper_overrides["data"])
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return data, out / "stage1_cache" / digest


def paper_config(name: str, data: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    if name == "ce":
        # the DRO-LT recipe's stage 1 exactly, so paper_dro_lt finds it in the stage-1 cache
        recipe = PRESETS["dro_lt_paper"]
        config = {"method": "ce", "classifier": "none",
                  **{key: recipe[key] for key in STAGE1_FIELDS if key in recipe}}
    else:
        config = dict(PRESETS[f"{name}_paper"])
    config.update(data)
    if sizes.paper_overrides:
        config.update(sizes.paper_overrides[name])
    return config


def stage_paper(name: str, args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    out = Path(args.out)
    data, cache_dir = paper_setup(args, sizes)
    config = paper_config(name, data, sizes)
    stage = f"paper_{name}"
    on_epoch, rows = epoch_recorder(stage, out, args.run_id, args.deadline,
                                    print_every=1 if args.tiny else 10)
    plan = TrialConfig.from_dict(config).phase_plan()
    started, started_at = time.perf_counter(), time.time()
    try:
        trial = run_trial(config, on_epoch, cache_dir=str(cache_dir))
    except OutOfTime as stop:
        timing = phase_timing(rows)
        return {
            "status": "out_of_time",
            "result": {"config": config, "plan": plan, "timing": timing, "stopped": str(stop),
                       "projected_seconds": _projected(plan, timing)},
            "headline": f"{stop}; projected {_projected(plan, timing) or 0:.0f} s for the plan",
        }
    wall = time.perf_counter() - started
    (out / f"{stage}-{args.run_id}.json").write_text(json.dumps(trial, default=str))
    timing = phase_timing(rows)
    first = next((row for row in rows if not row["replayed"]), None)
    # data build (decode or decode cache) and model set-up, before the first trained epoch
    setup = first["at"] - first["epoch_seconds"] - started_at if first else None
    test = {key: trial["test"][key] for key in ("all", "many", "medium", "few")}
    val = {key: trial["val"][key] for key in ("all", "many", "medium", "few")}
    from_cache = any(row["replayed"] for row in rows)
    result = {
        "config": config,
        "plan": plan,
        "dataset": trial["dataset"],
        "class_counts": trial["class_counts"],
        "status_trial": trial["status"],
        "stage1_from_cache": from_cache,
        "wall_seconds": wall,
        "setup_seconds": setup,
        "timing": timing,
        "test": test,
        "val": val,
        "test_per_class": trial["test"]["per_class"],
        "radii_range": trial_summary(trial)["radii_range"],
        "maxnorm_radius": trial["diagnostics"].get("maxnorm_radius"),
        "published": _published(name),
        "epochs": rows,
    }
    checks = {
        "completed": trial["status"] == "completed",
        "finite": trial_summary(trial)["finite"],
        "epochs_as_planned": all(
            sum(1 for row in rows if row["phase"] == phase) == epochs for phase, epochs in plan
        ),
    }
    if name == "dro_lt":
        result["stage1_cache_note"] = ("stage 1 reused from paper_ce" if from_cache else
                                       "stage 1 trained here: paper_ce's was not in the cache")
    goals = {}
    stage1 = timing.get("stage1")
    if stage1 and not args.tiny and stage1["epochs"] == plan[0][1]:
        goals = {"stage1_train_under_60s": stage1["train_seconds"] < 60,
                 "stage1_train_under_30s": stage1["train_seconds"] < 30}
    headline = (f"test {percent(test['all'])}% (many {percent(test['many'])}, medium "
                f"{percent(test['medium'])}, few {percent(test['few'])})"
                + (f"; stage 1 {stage1['epochs']} ep: train {stage1['train_seconds']:.1f} s, "
                   f"wall {stage1['wall_seconds']:.1f} s" if stage1 else "; stage 1 from cache")
                + f"; total {wall:.0f} s")
    return {"result": result, "checks": checks, "goals": goals, "headline": headline}


def _projected(plan: list[tuple[str, int]], timing: dict[str, dict[str, float]]) -> float | None:
    """Seconds the whole plan would take at the epoch rates seen so far."""
    per_epoch = {p: t["wall_seconds"] / t["epochs"] for p, t in timing.items() if t["epochs"]}
    if not per_epoch:
        return None
    fallback = max(per_epoch.values())
    return sum(epochs * per_epoch.get(phase, fallback) for phase, epochs in plan)


def _published(name: str) -> dict[str, Any]:
    if name == "ce":
        return {"cross-entropy (LDAM paper)": PUBLISHED["ce"][1]}
    if name == "dro_lt":
        # the DRO-LT paper's own CIFAR-10-LT figure is not in the project's sources
        return {"LDAM-DRW (LDAM paper)": PUBLISHED["ldam_drw"][1]}
    return {}


# ==================================================================== stage: fused_sweep
SWEEP_SPACE = "dro_lt"


class SeededDraw:
    """Stands in for the Optuna trial `Space.sample` asks: each dimension drawn independently
    and uniformly from its range (log-uniform where the dimension is log), as Optuna's
    RandomSampler draws, from one seeded generator; Optuna itself is absent on the GPU machine."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.rng.choice(list(choices))

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        if log:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)


def sweep_configs(args: argparse.Namespace, sizes: Sizes) -> list[dict[str, Any]]:
    """The sweep's trials: the dro_lt space's fixed settings for CIFAR-10-LT (its cifar plan,
    or --sweep-epochs split over its phases), the paper stages' data, and a seeded draw of the
    space's dimensions through the space's own sampling (Space.sample, to_config, derive)."""
    space = get_space(SWEEP_SPACE)
    data, _ = paper_setup(args, sizes)
    fixed = fixed_settings(space, data["dataset"], epochs=args.sweep_epochs or sizes.sweep_epochs)
    # one seed for every trial, as a sweep fixes it: the space shares its stage 1
    fixed.update(data, **(sizes.sweep_data or {}))
    draw = SeededDraw(args.sweep_seed)
    return [space.to_config(space.sample(draw), fixed) for _ in range(sizes.sweep_trials)]


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if finite(v)]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def stage_fused_sweep(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    out = Path(args.out)
    space = get_space(SWEEP_SPACE)
    configs = sweep_configs(args, sizes)
    plan = TrialConfig.from_dict(configs[0]).phase_plan()
    groups = [configs[i:i + args.fuse] for i in range(0, len(configs), args.fuse)]
    epochs_seen: list[int] = []

    def on_epoch(member: int, metrics: dict[str, Any], _snapshot: Callable) -> None:
        epochs_seen.append(member)
        # not synced, as the paper stages' progress: a sync per epoch would lengthen the run
        append_line(out / PROGRESS_FILE, {
            "run": args.run_id, "stage": "fused_sweep", "group": len(group_walls),
            "member": member, **{key: metrics[key] for key in (
                "phase", "phase_epoch", "train_loss", "val_all", "epoch_seconds",
                "fused_members")}, "at": time.time()}, sync=False)
        if metrics["phase_epoch"] == 1 and member == 0:
            print(f"  group {len(group_walls) + 1}/{len(groups)} {metrics['phase']}: "
                  f"{metrics['fused_members']} members, {metrics['epoch_seconds']:.2f} s an epoch",
                  flush=True)
        if args.deadline is not None and time.time() > args.deadline:
            raise OutOfTime(f"budget spent in fused group {len(group_walls) + 1}")

    group_walls: list[float] = []
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for group in groups:
            group_started = time.perf_counter()
            results += run_trials(group, on_epoch)
            group_walls.append(time.perf_counter() - group_started)
    except OutOfTime as stop:
        return {"status": "out_of_time",
                "result": {"configs": configs, "plan": plan, "fuse": args.fuse,
                           "group_walls": group_walls, "member_epochs": len(epochs_seen),
                           "seconds_so_far": time.perf_counter() - started},
                "headline": f"{stop}; {len(group_walls)}/{len(groups)} groups done"}
    wall = time.perf_counter() - started
    members = [{"status": r["status"], "val_all": r["val"]["all"], "test_all": r["test"]["all"],
                "radius": c.get("radius"), "lam": c.get("lam")}
               for r, c in zip(results, configs, strict=True)]
    print(f"  fused: {len(configs)} trials in {len(groups)} group(s) of <= {args.fuse}: "
          f"{wall:.1f} s", flush=True)
    unfused = _unfused_estimate(args, configs[0], len(configs)) if args.sweep_unfused else \
        "not measured (--no-sweep-unfused)"
    completed = [m for m in members if m["status"] == "completed"]
    best = max(completed, key=lambda m: m["val_all"], default=None)
    test = _spread([m["test_all"] for m in completed])
    result = {
        "space": SWEEP_SPACE,
        "draw": f"seeded random draw (seed {args.sweep_seed}) through Space.sample: each "
                "dimension uniform, or log-uniform where the space says log",
        "shares_stage1": space.shares_stage1,
        "stage1_note": "every member trains its own copy of the shared stage 1 "
                       "(run_trials on this branch does not use the stage-1 cache)",
        "dataset_config": {k: configs[0].get(k) for k in ("dataset", "imbalance", "protocol",
                                                          "n_max", "val_per_class")},
        "plan": plan, "trials": len(configs), "fuse": args.fuse, "groups": len(groups),
        "wall_seconds": wall, "group_walls": group_walls,
        "members": members,
        "val_all": _spread([m["val_all"] for m in completed]),
        "test_all": test,
        "best_by_val": best,
        "unfused": unfused,
        "configs": configs,
    }
    checks = {
        "every_trial_ended": len(results) == len(configs),
        "every_member_epoch_reported": len(epochs_seen) == sum(
            len(r["history"]) for r in results),
        "completed_or_diverged": all(m["status"] in ("completed", "diverged") for m in members),
    }
    estimate = unfused.get("estimate_seconds") if isinstance(unfused, dict) else None
    headline = (f"{len(configs)} trials fused {args.fuse} a group: {wall:.0f} s; test "
                + (f"{percent(test['min'])}-{percent(test['max'])}% (median "
                   f"{percent(test['median'])})" if test else "-")
                + f", {len(completed)}/{len(configs)} completed; unfused x{len(configs)} "
                + (f"{estimate:.0f} s ({estimate / wall:.2f}x the fused wall)" if estimate
                   else "not measured"))
    return {"result": result, "checks": checks, "headline": headline}


def _unfused_estimate(args: argparse.Namespace, config: dict[str, Any],
                      trials: int) -> dict[str, Any] | str:
    """One unfused trial of the sweep's first config, measured; times the number of trials."""
    on_epoch, rows = epoch_recorder("fused_sweep_unfused", Path(args.out), args.run_id,
                                    args.deadline, print_every=1 if args.tiny else 20)
    started = time.perf_counter()
    try:
        trial = run_trial(config, on_epoch)
    except OutOfTime as stop:
        return f"not measured ({stop})"
    wall = time.perf_counter() - started
    timing = phase_timing(rows)
    stage1 = timing.get("stage1", {}).get("wall_seconds", 0.0)
    rest = sum(t["wall_seconds"] for phase, t in timing.items() if phase != "stage1")
    return {
        "trial_wall_seconds": wall,
        "estimate_seconds": wall * trials,
        # an unfused sweep replays one stage 1 from the cache: epochs only, set-up left out
        "estimate_stage1_shared_epoch_seconds": stage1 + rest * trials,
        "timing": timing,
        "status": trial["status"],
        "test_all": trial["test"]["all"],
    }


# ==================================================================== orchestration
STAGE_FUNCTIONS: dict[str, Callable[[argparse.Namespace, Sizes], dict[str, Any]]] = {
    "env": stage_env,
    "correctness": stage_correctness,
    "throughput": stage_throughput,
    "packing": stage_packing,
    "paper_ce": lambda args, sizes: stage_paper("ce", args, sizes),
    "paper_dro_lt": lambda args, sizes: stage_paper("dro_lt", args, sizes),
    "paper_wb": lambda args, sizes: stage_paper("wb", args, sizes),
    "fused": stage_fused,
    "fused_sweep": stage_fused_sweep,
}
WORKERS = {"compile_worker": compile_worker, "packing_worker": packing_worker}


def child_command(args: argparse.Namespace, child: str, *extra: str) -> list[str]:
    command = [sys.executable, str(SCRIPT), "--device", args.device, "--out", str(args.out),
               "--protocol", args.protocol, "--compile-modes", args.compile_modes,
               "--packing-k", args.packing_k, "--fused-ks", args.fused_ks,
               "--fuse", str(args.fuse), "--sweep-seed", str(args.sweep_seed),
               "--child", child, "--run-id", args.run_id]
    if args.tiny:
        command.append("--tiny")
    if args.data_dir is not None:
        command += ["--data-dir", str(args.data_dir)]
    if args.sweep_epochs is not None:
        command += ["--sweep-epochs", str(args.sweep_epochs)]
    if not args.sweep_unfused:
        command.append("--no-sweep-unfused")
    if args.deadline is not None:
        command += ["--deadline", repr(args.deadline)]
    return command + list(extra)


def run_stage(args: argparse.Namespace, sizes: Sizes) -> int:
    """Inside a stage process: run it and append its one line, whatever happens."""
    stage = args.child
    record: dict[str, Any] = {"stage": stage, "run": args.run_id, "device": args.device,
                              "tiny": args.tiny, "started": _utc()}
    started = time.perf_counter()
    try:
        if IMPORT_ERROR is not None and stage != "env":
            raise RuntimeError("the project does not import:\n" + IMPORT_ERROR)
        outcome = STAGE_FUNCTIONS[stage](args, sizes)
        checks = outcome.get("checks", {})
        record.update(
            status=outcome.get("status") or (STATUS_PASSED if all(checks.values())
                                             else "checks_failed"),
            checks=checks, goals=outcome.get("goals", {}), headline=outcome.get("headline", ""),
            result=outcome.get("result", {}),
        )
    except Exception as error:  # the line says what broke; the next stage still runs
        record.update(status="error", error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-6000:])
    record["seconds"] = time.perf_counter() - started
    record["forbidden_modules_loaded"] = forbidden_loaded()
    append_line(Path(args.out) / RESULTS_FILE, record)
    return 0 if record["status"] == STATUS_PASSED else 1


def orchestrate(args: argparse.Namespace, stages: list[str], sizes: Sizes) -> int:
    out = Path(args.out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    args.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    args.deadline = time.time() + args.budget if args.budget is not None else None
    env = dict(os.environ)
    # The decoded-image cache lives with the results: the paper stages of a second run reuse
    # the first run's decode, and nothing is written to the home folder of a borrowed machine.
    env.setdefault("TAILTUNE_CACHE_DIR", str((out / "cache").resolve()))
    print(f"gpu_proof run {args.run_id}: stages {', '.join(stages)} on {args.device}"
          + (" (tiny)" if args.tiny else "") + f"; results in {out / RESULTS_FILE}", flush=True)
    records = []
    for stage in stages:
        remaining = None if args.deadline is None else args.deadline - time.time()
        if remaining is not None and remaining < MIN_STAGE_SECONDS:
            record = {"stage": stage, "run": args.run_id, "device": args.device,
                      "tiny": args.tiny, "status": "skipped", "seconds": 0.0,
                      "headline": f"budget spent ({args.budget:g} s)"}
            append_line(out / RESULTS_FILE, record)
            records.append(record)
            continue
        timeout = sizes.stage_timeout if remaining is None else min(
            sizes.stage_timeout, remaining + BUDGET_GRACE_SECONDS)
        if stage in UNLIMITED_STAGES and remaining is None:
            timeout = None  # these take what they take unless --budget says otherwise
        print(f"== {stage}", flush=True)
        started = time.perf_counter()
        log = out / "logs" / f"{args.run_id}-{stage}.log"
        stage_env = dict(env)
        if stage == "correctness":
            # cuBLAS is deterministic only with a fixed workspace, which must be set before the
            # process creates its CUDA context; the repeat check's diagnosis needs it
            stage_env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        code = run_echoed(child_command(args, stage), timeout, log, f"[{stage}] ", stage_env)
        record = next((r for r in read_lines(out / RESULTS_FILE)
                       if r.get("run") == args.run_id and r.get("stage") == stage), None)
        if record is None:  # killed, or died without writing: say so in its place
            record = {"stage": stage, "run": args.run_id, "device": args.device,
                      "tiny": args.tiny, "status": "timeout" if code is None else "error",
                      "seconds": time.perf_counter() - started,
                      "error": (f"stopped after {timeout:.0f} s" if code is None else
                                f"stage process exited {code} without writing its line"),
                      "log_tail": log_tail(log)}
            append_line(out / RESULTS_FILE, record)
        # process start and imports included: what a stage really costs of the machine's time
        record["wall"] = time.perf_counter() - started
        records.append(record)
    print_table(records)
    return 0 if all(r["status"] == STATUS_PASSED for r in records) else 1


def print_table(records: list[dict[str, Any]]) -> None:
    rows = [("stage", "status", "seconds", "wall", "result")]
    for r in records:
        text = r.get("headline") or next(iter((r.get("error") or "").splitlines()), "")
        missed = [name for name, met in (r.get("goals") or {}).items() if not met]
        if missed:
            text += f" [goal missed: {', '.join(missed)}]"
        failed = [name for name, ok in (r.get("checks") or {}).items() if not ok]
        if failed:
            text += f" [check failed: {', '.join(failed)}]"
        rows.append((r["stage"], r["status"], f"{r.get('seconds', 0.0):.1f}",
                     f"{r.get('wall', 0.0):.1f}", text))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
              + "  " + row[4])
    paper = [r for r in records if r["stage"].startswith("paper") and r.get("result", {})
             .get("test")]
    if paper:
        source = paper[0]["result"]["dataset"].get("source", "")
        print(f"\nCIFAR-10-LT IF {paper[0]['result']['config']['imbalance']:g}, {source}, "
              f"ResNet-32, protocol {paper[0]['result']['config']['protocol']}: test accuracy %")
        print(f"{'method':<10}{'all':>8}{'many':>8}{'medium':>8}{'few':>8}  published")
        for r in paper:
            test = r["result"]["test"]
            published = ", ".join(f"{k} {v}" for k, v in r["result"]["published"].items()) or "-"
            print(f"{r['stage'][6:]:<10}" + "".join(f"{percent(test[k]):>8}" for k in
                                                     ("all", "many", "medium", "few"))
                  + f"  {published}")


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_stages(text: str) -> list[str]:
    chosen: set[str] = set()
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in STAGES:
            chosen.add(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown stage {name!r}; accepted: {', '.join(STAGES + tuple(ALIASES))}")
    if not chosen:
        raise argparse.ArgumentTypeError("no stage chosen")
    return [stage for stage in STAGES if stage in chosen]  # cheap stages first, always


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the CPU rehearsal")
    parser.add_argument("--out", default="gpu_proof_out", help="results folder")
    parser.add_argument("--stages", default="all", help="comma-separated stages, paper or all")
    parser.add_argument("--data-dir", help="the extracted CIFAR-10 JPEG tree (paper stages)")
    parser.add_argument("--protocol", default="holdout", choices=("holdout", "paper"),
                        help="paper stages: held-out validation, or the official counts")
    parser.add_argument("--budget", type=float,
                        help="seconds for this run: later stages are skipped, training stops")
    parser.add_argument("--compile-modes", default="default,reduce-overhead",
                        help="torch.compile modes for the throughput stage, or none")
    parser.add_argument("--packing-k", help="trial processes per packing round (1,2,4,8)")
    parser.add_argument("--fused-ks", help="fused members per measurement (1,2,4,8,16,32); "
                        "the first K out of CUDA memory ends the list")
    parser.add_argument("--fuse", type=int, help="fused_sweep: members a fused group (16)")
    parser.add_argument("--sweep-epochs", type=int,
                        help="fused_sweep: total epochs a trial, split over the dro_lt plan's "
                             "phases (default: the plan for CIFAR, 200 + 80 + 20)")
    parser.add_argument("--sweep-seed", type=int, default=0,
                        help="fused_sweep: seed of the draw of the trials' hyperparameters")
    parser.add_argument("--no-sweep-unfused", dest="sweep_unfused", action="store_false",
                        help="fused_sweep: do not train the one unfused trial of the comparison")
    # internal: a stage or worker process started by this script
    for name in ("--child", "--run-id", "--sync-dir", "--result", "--compile-mode",
                 "--compile-backend"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.stage_list = parse_stages(args.stages)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--stages: {error}")
    if args.budget is not None and not args.budget >= 0:
        parser.error(f"--budget must be a number of seconds >= 0; got {args.budget:g}")
    args.packing_k = args.packing_k or ("1,2" if args.tiny else "1,2,4,8")
    try:
        ks = [int(k) for k in args.packing_k.split(",")]
    except ValueError:
        ks = [0]
    if not ks or min(ks) < 1:
        parser.error(f"--packing-k must be integers >= 1; got {args.packing_k}")
    args.fused_ks = args.fused_ks or ("1,2" if args.tiny else "1,2,4,8,16,32")
    try:
        fused_ks = [int(k) for k in args.fused_ks.split(",")]
    except ValueError:
        fused_ks = [0]
    if not fused_ks or min(fused_ks) < 1:
        parser.error(f"--fused-ks must be integers >= 1; got {args.fused_ks}")
    args.fuse = args.fuse or (2 if args.tiny else 16)
    if args.fuse < 1:
        parser.error(f"--fuse must be an integer >= 1; got {args.fuse}")
    if args.sweep_epochs is not None and args.sweep_epochs < 3:
        parser.error(f"--sweep-epochs must be >= 3 (one a phase); got {args.sweep_epochs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else FULL
    if args.child in WORKERS:
        return WORKERS[args.child](args, sizes)
    if args.child:
        return run_stage(args, sizes)
    return orchestrate(args, args.stage_list, sizes)


if __name__ == "__main__":
    raise SystemExit(main())
