"""How much of a default sweep's wall time is not training: python benchmarks/sweep_overhead.py

Runs `python search/run.py --space S` (the embedded default: digits_lt, 8 trials, ASHA) for each
space in a fresh results folder and reads the trials' epoch times back from MLflow.

    wall          the whole command, as a user waits for it (Python, Ray start, the sweep, exit)
    startup       wall minus the sweep loop (imports, dataset check, Ray start and stop)
    epoch time    the sum over trials of their live epochs' seconds (training + the per-epoch
                  validation pass; epochs replayed from the stage-1 cache count 0)
    trial time    the sum over trials of the time inside the trial function (data and model
                  set-up, epochs, the pipeline's per-epoch extras such as DRO-LT centroids,
                  the final test pass)
    overhead      1 - epoch time / (wall x concurrent trial slots): the share of the sweep's
                  capacity not spent in training epochs (the issue's measure)
    platform      1 - trial time / (wall x slots): what Ray, Tune, MLflow, Optuna, checkpoints,
                  process start and idle slots at the tail cost, the pipeline's own extras
                  excluded

A fused sweep (`--fuse K`, issue 15): the members of a fused trial train each epoch together,
so a member's epoch counts as its share (epoch_seconds / fused_members, logged each epoch) of
the group's epoch, in the group's CPUs (search.cluster.fit_resources, the sweep's own rule);
slots are then counted in CPUs: wall x the machine's CPUs.

Options: --spaces ce dro_lt ... (default: all), --fuse K, --json PATH to keep the numbers,
--args "..." more arguments for every sweep (real data: "--dataset cifar10_lt --data-dir DIR
--epochs 30"). Not a test. benchmarks/fusion.py --sweeps runs it fused and unfused in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(space: str, storage: Path, extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    argv = _argv(space, space, storage, extra)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "search/run.py", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {space} failed:\n{proc.stdout}\n{proc.stderr}")
    return read_back(space, space, storage, extra, wall, proc.stdout)


def _argv(space: str, name: str, storage: Path, extra: tuple[str, ...]) -> list[str]:
    return ["--space", space, "--name", name, "--storage", str(storage), *extra]


def read_back(space: str, name: str, storage: Path, extra: tuple[str, ...], wall: float,
              printed: str) -> dict:
    """The shares of a finished sweep `search/run.py --space space --name name --storage
    storage *extra`: `wall` the command's seconds, `printed` its standard output."""
    from mlflow.tracking import MlflowClient

    from results.mlflow_logging import local_tracking_uri
    from search.cluster import fit_resources
    from search.options import parse_options

    options, _ = parse_options(_argv(space, name, storage, extra))
    resources = fit_resources(options, {"CPU": float(os.cpu_count())})
    sweep_seconds = float(re.search(r"Sweep \S+ \w+ in ([\d.]+) s", printed).group(1))
    slots = int(re.search(r"(\d+) at a time", printed).group(1))

    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("tailtune")
    epoch_seconds, trial_seconds, live_epochs, statuses, fused_runs = 0.0, 0.0, 0, {}, 0
    for run in client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'"):
        status = run.data.tags["tailtune.status"]
        statuses[status] = statuses.get(status, 0) + 1
        together = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                        "fused_members")}
        # a slot is a trial's CPUs: a fused member's share of its group's epoch, in the
        # group's CPUs, is its slot time (one member alone: a trial's)
        cpus = resources.cpus_for(fused=bool(together)) / resources.cpus
        for metric in client.get_metric_history(run.info.run_id, "epoch_seconds"):
            epoch_seconds += metric.value * cpus / together.get(metric.step, 1.0)
            live_epochs += metric.value > 0
        fused_runs += bool(together)
        trial_seconds += run.data.metrics.get("trial_seconds", 0.0)  # its last value
    capacity = wall * slots
    return {"space": space, "args": " ".join(extra), "wall_s": round(wall, 1),
            "sweep_loop_s": sweep_seconds,
            "startup_s": round(wall - sweep_seconds, 1), "slots": slots,
            "epoch_s": round(epoch_seconds, 1), "trial_s": round(trial_seconds, 1),
            "live_epochs": live_epochs,
            "overhead_share": round(1 - epoch_seconds / capacity, 3),
            # members' trial times overlap (one process): no platform share for a fused sweep
            "platform_share": None if fused_runs else round(1 - trial_seconds / capacity, 3),
            "trials": statuses}


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", default=["ce", "dro_lt", "wb", "dro_wb"])
    parser.add_argument("--fuse", type=int, help="run the sweeps fused, K trials at a time")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--args", default="", help="more search/run.py arguments, one string")
    args = parser.parse_args()
    extra = (*(("--fuse", str(args.fuse)) if args.fuse else ()), *shlex.split(args.args))
    rows = []
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    for space in args.spaces:
        with tempfile.TemporaryDirectory(prefix=f"tailtune-bench-{space}-") as folder:
            row = measure(space, Path(folder), extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'space':<8} {'wall s':>7} {'startup s':>9} {'epoch s':>8} {'trial s':>8} "
          f"{'slots':>5} {'overhead':>8} {'platform':>8}  trials")
    for r in rows:
        print(f"{r['space']:<8} {r['wall_s']:>7} {r['startup_s']:>9} {r['epoch_s']:>8} "
              f"{r['trial_s']:>8} {r['slots']:>5} {r['overhead_share']:>8.1%} "
              f"{_share(r['platform_share']):>8}  {r['trials']}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other work on the machine "
          "inflates every number)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
