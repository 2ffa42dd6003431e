"""Does a tailtune sweep beat the papers' recipes on real images, at equal compute?

Under the CPU protocol of docs/real_data.md, on CIFAR-10-LT IF 100 (the JPEG q75 copy) and
Fashion-MNIST-LT IF 100, each row of the table is:

- `ce`: plain cross-entropy for the whole budget;
- `dro_lt_paper`, `wb_paper`: the authors' recipes (presets), their phases scaled to the budget;
- `sweep:<space>`: a real sweep (`python search/run.py --space <space>`, Optuna TPE + ASHA,
  `TRIALS` trials of the same budget each), the best completed trial chosen on validation only,
  then its configuration trained again with three fresh seeds.

Every row reports test all / many / medium / few as mean +- std over the three seeds, and its
wall time (for a sweep: the sweep's, then the re-runs'). Trials run as the single-trial command
and sweeps as the sweep command, two at a time (one CPU thread each), so what is measured is
what a user runs.

Resumable: each finished unit (one seed of a row, one sweep) is appended to
`<out>/units.jsonl` the moment it ends, and a new run skips every unit found there; a sweep cut
short is continued with `--resume`. The table is rewritten after every unit.

    python benchmarks/real_data.py --cifar-dir /path/to/cifar10-jpg          # hours on 2 cores
    python benchmarks/real_data.py --cifar-dir DIR --rows cifar:ce,cifar:sweep:dro_lt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from compare_methods import environment  # noqa: E402

from search.ledger import Ledger, Status  # noqa: E402
from search.options import SWEEP_FILE  # noqa: E402
from spaces import get_space  # noqa: E402
from spaces.core import scale_phases  # noqa: E402
from trainables.config import PRESETS  # noqa: E402

GROUPS = ("all", "many", "medium", "few")
SEEDS = (1, 2, 3)  # the re-run seeds; sweeps search with seed 0, so none is reused
TRIALS = 8  # trials per sweep
# Phase-epoch fields of a trial config, in phase order.
PHASES = ("epochs", "dro_epochs", "cls_epochs")
READING = "## Reading"


@dataclass(frozen=True)
class Benchmark:
    """One dataset under the CPU protocol (docs/real_data.md)."""

    key: str
    dataset: str
    data: dict[str, Any]  # data options shared by every row (TrialConfig fields)
    budget: int  # epochs per trial, all phases together
    rows: tuple[str, ...]
    published: str


# The CPU protocol. Why these numbers: docs/real_data.md.
CPU_DATA = {"imbalance": 100.0, "n_max": 1000, "val_per_class": 100, "model": "resnet8",
            "batch_size": 128, "dro_batch_size": 128, "cls_batch_size": 128, "warmup_epochs": 2,
            "device": "cpu"}
BENCHMARKS = {
    "cifar": Benchmark(
        "cifar", "cifar10_lt", CPU_DATA, 30,
        ("ce", "dro_lt_paper", "wb_paper", "sweep:dro_lt", "sweep:wb", "sweep:dro_wb"),
        "CIFAR-10-LT IF 100, ResNet-32, 200 epochs, official pickles (LDAM paper): "
        "cross-entropy 70.36, LDAM-DRW 77.03",
    ),
    "fashion": Benchmark(
        "fashion", "fashion_mnist_lt", CPU_DATA, 20,
        ("ce", "dro_lt_paper", "wb_paper", "sweep:dro_wb"),
        "none published for Fashion-MNIST-LT IF 100",
    ),
}


@dataclass
class Unit:
    """One piece of work: a trial (row, seed) or a sweep (row)."""

    bench: str
    row: str
    seed: int | None = None  # None: the sweep itself
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.bench}:{self.row}" + ("" if self.seed is None else f":seed{self.seed}")


# ---------------------------------------------------------------- configurations
def scaled(plan: dict[str, Any], budget: int) -> dict[str, Any]:
    """The plan's phase epochs scaled to `budget` in proportion (as `search/run.py --epochs`)."""
    epochs = {name: int(plan.get(name, 0) or 0) for name in PHASES}
    return {**plan, **scale_phases(epochs, budget)}


def baseline_config(bench: Benchmark, row: str) -> dict[str, Any]:
    base = {"dataset": bench.dataset, **bench.data}
    if row == "ce":
        return {**base, "method": "ce", "epochs": bench.budget, "schedule": "cosine"}
    preset = dict(PRESETS[row])
    # The recipes' own batch sizes and warm-up stay; only their length is scaled.
    keep = {k: v for k, v in base.items() if not k.endswith("batch_size") and k != "warmup_epochs"}
    return scaled({**preset, **keep}, bench.budget)


def sweep_command(bench: Benchmark, space: str, storage: Path, resume: bool) -> list[str]:
    name = sweep_name(bench, space)
    if resume:
        return [sys.executable, "search/run.py", "--resume", "--name", name,
                "--storage", str(storage)]
    data = bench.data
    command = [sys.executable, "search/run.py", "--space", space, "--dataset", bench.dataset,
               "--data-dir", data_dir(bench), "--imbalance", str(data["imbalance"]),
               "--n-max", str(data["n_max"]), "--val-per-class", str(data["val_per_class"]),
               "--model", data["model"], "--epochs", str(bench.budget),
               "--num-samples", str(TRIALS), "--max-concurrent", "2", "--cpus-per-trial", "1",
               "--storage", str(storage), "--name", name, "--experiment", "real_data",
               "--seed", "0", "--no-plots"]
    return command


def sweep_name(bench: Benchmark, space: str) -> str:
    return f"real-{bench.key}-{space}"


DATA_DIRS: dict[str, str] = {}


def data_dir(bench: Benchmark) -> str:
    return DATA_DIRS[bench.key]


# ---------------------------------------------------------------- running units
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def run_child(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run, with the child known to `stop_children` (a stopped benchmark leaves no
    trial or sweep running behind it)."""
    with _CHILDREN_LOCK:  # no new child once a stop began: it would outlive the benchmark
        if _STOPPING.is_set():
            raise RuntimeError("stopping")
        proc = subprocess.Popen(args, **kwargs)
        _CHILDREN.add(proc)
    with proc:
        try:
            stdout, stderr = proc.communicate()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def stop_children(signum: int, _frame: Any) -> None:
    # SIGTERM lets a sweep stop as it does on Ctrl-C (resumable); trials are simply re-run.
    with _CHILDREN_LOCK:
        _STOPPING.set()
        children = list(_CHILDREN)
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    print("\nstopped; finished units are kept: run the same command again to continue",
          file=sys.stderr, flush=True)
    os._exit(1)  # worker threads are blocked in communicate(); leave without them

def run_trial_unit(unit: Unit, log_dir: Path) -> dict[str, Any]:
    config = {**unit.config, "seed": unit.seed, "data_dir": data_dir(BENCHMARKS[unit.bench])}
    args = [sys.executable, "-m", "trainables.pipeline", "--json"]
    # a method's own options (TrialConfig.options) are flags of their own on the command line
    flat = {**{k: v for k, v in config.items() if k != "options"}, **(config.get("options") or {})}
    for name, value in flat.items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    start = time.perf_counter()
    proc = run_child(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env=one_thread_env())
    wall = time.perf_counter() - start
    (log_dir / f"{unit.key.replace(':', '_')}.log").write_text(
        shlex.join(args) + "\n\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{unit.key} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout)
    return {"key": unit.key, "kind": "trial", "wall_seconds": wall, "config": config,
            "command": shlex.join(args[1:]),
            "val": pick(result["val"]), "test": pick(result["test"]),
            "class_counts": result["class_counts"], "status": result["status"],
            "radii": result["diagnostics"].get("radii")}


def run_sweep_unit(unit: Unit, storage: Path, log_dir: Path) -> dict[str, Any]:
    bench = BENCHMARKS[unit.bench]
    space = unit.row.split(":", 1)[1]
    folder = storage / sweep_name(bench, space)
    resume = (folder / SWEEP_FILE).is_file()
    command = sweep_command(bench, space, storage, resume)
    start = time.perf_counter()
    with open(log_dir / f"{unit.key.replace(':', '_')}.log", "a") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        proc = run_child(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                         env=one_thread_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{unit.key} sweep exited {proc.returncode}; see its log in "
                           f"{log_dir}")
    best = best_trial(folder)
    return {"key": unit.key, "kind": "sweep", "wall_seconds": wall,
            "command": shlex.join(sweep_command(bench, space, storage, False)[1:]),
            "best_config": best["config"], "best_val": best["val"],
            "trials": best["counts"]}


def best_trial(folder: Path) -> dict[str, Any]:
    """The completed trial with the highest validation accuracy, from the sweep's ledger."""
    entries = Ledger(folder).entries()
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.status.value] = counts.get(entry.status.value, 0) + 1
    done = [e for e in entries if e.status is Status.COMPLETED]
    if not done:
        raise RuntimeError(f"no completed trial in {folder}")
    outcome = max(done, key=lambda entry: entry.result["val_all"]).result["outcome"]
    return {"config": outcome["config"], "val": pick(outcome["val"]), "counts": counts}


def pick(report: dict[str, Any]) -> dict[str, Any]:
    return {group: report.get(group) for group in GROUPS}


def one_thread_env() -> dict[str, str]:
    # two units at a time on a 2-core machine: one thread each, so they do not fight
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------- the ledger of finished units
def read_units(path: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["key"]] = entry
    return done


def append_unit(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------- the table
def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(bench: Benchmark, done: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| row | seeds | test all | many | medium | few | val all | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in bench.rows:
        trials = [done[k] for k in (f"{bench.key}:{row}:seed{s}" for s in SEEDS) if k in done]
        sweep = done.get(f"{bench.key}:{row}")
        cells = [fmt([t["test"][g] for t in trials if t["test"][g] is not None])
                 for g in GROUPS]
        val = fmt([t["val"]["all"] for t in trials])
        wall = sum(t["wall_seconds"] for t in trials)
        when = f"{wall / 60:.1f} min ({len(trials)} runs)" if trials else "not measured"
        if row.startswith("sweep:"):
            when = ("sweep not run" if sweep is None else
                    f"sweep {sweep['wall_seconds'] / 60:.1f} min + re-runs {wall / 60:.1f} min")
        lines.append(f"| {row} | {len(trials)}/{len(SEEDS)} | " + " | ".join(cells)
                     + f" | {val} | {when} |")
    return lines


def configs_section(bench: Benchmark, done: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for row in bench.rows:
        if not row.startswith("sweep:"):
            continue
        sweep = done.get(f"{bench.key}:{row}")
        if sweep is None:
            continue
        space = get_space(row.split(":", 1)[1])
        config = sweep["best_config"]
        # a derived dimension is stored as the field it sets (cb_one_minus_beta as cb_beta)
        chosen = {d.name: config.get(d.name, None) for d in space.dimensions
                  if not d.when or config.get(d.when[0]) in d.when[1]}  # sampled ones only
        if "cb_one_minus_beta" in chosen and config.get("cb_beta") is not None:
            chosen["cb_one_minus_beta"] = 1.0 - config["cb_beta"]
        lines.append(f"- `{row}`: {sweep['trials']} trials; best on validation "
                     f"(val all {100 * sweep['best_val']['all']:.1f}): "
                     + ", ".join(f"{k}={_short(v)}" for k, v in chosen.items()))
    return lines


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out: Path, done: dict[str, dict[str, Any]], benches: list[Benchmark],
                 started: str) -> None:
    cpu, *versions = environment()["machine"].split(", ")
    machine = (f"{os.cpu_count()} CPUs ({cpu}), {', '.join(versions[1:])}; each trial one torch "
               f"thread, two at a time; load average at writing {os.getloadavg()[0]:.1f}")
    lines = ["# Real data: sweeps against the papers' recipes at equal compute (CPU protocol)",
             "", f"Measured with `python benchmarks/real_data.py` (units in "
             f"`real_data/units.jsonl`; this file last written {started}). Machine: "
             + machine + ".",
             "Protocol: docs/real_data.md. Test accuracy in %, mean ± sample std over seeds "
             f"{', '.join(map(str, SEEDS))}; selection on validation only.", ""]
    for bench in benches:
        lines += [f"## {bench.dataset} ({bench.key})", "",
                  f"Data: {json.dumps(bench.data)}, {bench.budget} epochs per trial. "
                  f"Published reference: {bench.published}.", ""]
        lines += table(bench, done) + [""]
        lines += configs_section(bench, done) + [""]
    # A hand-written "## Reading" section at the end survives the rewrite.
    path = out / "real_data.md"
    previous = path.read_text() if path.is_file() else ""
    reading = previous[previous.index(READING):] if READING in previous else ""
    path.write_text("\n".join(lines) + ("\n" + reading if reading else ""))


# ---------------------------------------------------------------- main
def plan_units(benches: list[Benchmark], done: dict[str, dict[str, Any]],
               rows: set[str] | None) -> tuple[list[Unit], list[Unit]]:
    """(sweeps to run, trials whose config is known); re-runs of a sweep wait for it."""
    sweeps, trials = [], []
    for bench in benches:
        for row in bench.rows:
            if rows is not None and f"{bench.key}:{row}" not in rows:
                continue
            if row.startswith("sweep:"):
                sweep = done.get(f"{bench.key}:{row}")
                if sweep is None:
                    sweeps.append(Unit(bench.key, row))
                    continue
                config = {k: v for k, v in sweep["best_config"].items()
                          if k not in ("seed", "data_dir", "download", "device")}
                config["device"] = "cpu"
            else:
                config = baseline_config(bench, row)
            trials += [Unit(bench.key, row, seed, config) for seed in SEEDS
                       if f"{bench.key}:{row}:seed{seed}" not in done]
    return sweeps, trials


def main(argv: list[str] | None = None) -> int:
    global SEEDS, TRIALS  # the protocol's constants, overridable for a smoke run
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar-dir", help="the extracted CIFAR-10 JPEG tree (cifar10-jpg/)")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist",
                        help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="where real_data.md, units.jsonl and the logs go")
    parser.add_argument("--benchmarks", default="cifar,fashion", help="cifar, fashion or both")
    parser.add_argument("--rows", help="only these rows, e.g. cifar:ce,fashion:sweep:dro_wb")
    parser.add_argument("--parallel", type=int, default=2, help="units at once (default: 2)")
    # Smaller than the protocol, for a smoke test; the table then says what was run.
    parser.add_argument("--epochs", type=int, help="epochs per trial instead of the protocol's")
    parser.add_argument("--n-max", type=int, help="n_max instead of the protocol's")
    parser.add_argument("--trials", type=int, default=TRIALS, help="trials per sweep")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="re-run seeds")
    args = parser.parse_args(argv)
    SEEDS, TRIALS = tuple(int(s) for s in args.seeds.split(",")), args.trials
    for key, bench in BENCHMARKS.items():
        data = {**bench.data, **({"n_max": args.n_max} if args.n_max else {})}
        BENCHMARKS[key] = dataclasses.replace(bench, data=data,
                                              budget=args.epochs or bench.budget)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_children)
    benches = [BENCHMARKS[key] for key in args.benchmarks.split(",")]
    if any(b.key == "cifar" for b in benches) and not args.cifar_dir:
        parser.error("--cifar-dir is required for the cifar benchmark")
    DATA_DIRS.update(cifar=str(Path(args.cifar_dir or ".").resolve()),
                     fashion=str(Path(args.fashion_dir).resolve()))
    out = Path(args.out)
    work = out / "real_data"
    logs, storage = work / "logs", work / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    ledger = work / "units.jsonl"
    rows = set(args.rows.split(",")) if args.rows else None
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    failures = 0

    def finish(entry: dict[str, Any]) -> None:
        append_unit(ledger, entry)
        done[entry["key"]] = entry
        write_report(out, done, benches, started)
        print(f"done {entry['key']} in {entry['wall_seconds']:.0f} s", flush=True)

    done = read_units(ledger)
    while True:
        sweeps, trials = plan_units(benches, done, rows)
        if not sweeps and not trials:
            break
        # Known trials first, two at a time; then one sweep (it uses both cores itself, two
        # trials at a time), after which its re-runs are known trials.
        progressed = False
        if trials:
            with ThreadPoolExecutor(args.parallel) as pool:
                futures = [(u, pool.submit(run_trial_unit, u, logs)) for u in trials]
                for unit, future in futures:
                    try:
                        finish(future.result())
                        progressed = True
                    except RuntimeError as err:
                        failures += 1
                        print(f"FAILED {unit.key}: {err}", flush=True)
        elif sweeps:
            print(f"sweep {sweeps[0].key} ...", flush=True)
            try:
                finish(run_sweep_unit(sweeps[0], storage, logs))
                progressed = True
            except RuntimeError as err:
                failures += 1
                print(f"FAILED {err}", flush=True)
        if not progressed:
            break
    write_report(out, done, benches, started)
    print(f"report: {out / 'real_data.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
