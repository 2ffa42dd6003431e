"""Start-up of `python search/run.py` before Ray: wall times of the quick exits and of the path to
`search.cluster.connect` (where ray.init is called), each in a fresh interpreter, medians.

- `--space nope`: bad input (one line on stderr, exit 2);
- `--help`;
- to connect: `search/run.py --space dro_lt --storage <temp folder>` with `connect` replaced by
  a stop that prints the seconds since this child's first line and the heavy modules imported
  by then (interpreter start, about 0.05 s, is not included), then exits without starting Ray.

    python benchmarks/startup.py --runs 5
    python -X importtime benchmarks/startup.py --to-connect 2> imports.txt   # one profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "pandas", "sklearn", "scipy", "matplotlib", "plotly", "optuna", "ray")


def to_connect(argv: list[str]) -> None:
    """In this process: run search/run.py's main until it would connect to Ray."""
    sys.path.insert(0, str(ROOT))
    import search.cluster as cluster
    from search import run

    def stop(address: object) -> None:
        heavy = ",".join(m for m in HEAVY if m in sys.modules)
        print(f"TO_CONNECT {time.perf_counter() - T0:.2f} {heavy}", flush=True)
        os._exit(0)

    cluster.connect = stop
    run.main(argv)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--to-connect", action="store_true", help="(child) stop at connect")
    args = p.parse_args()
    if args.to_connect:
        with tempfile.TemporaryDirectory() as storage:
            to_connect(["--space", "dro_lt", "--storage", storage])
        return 1  # connect was never reached
    times: dict[str, list[float]] = {"--space nope": [], "--help": [], "to connect": []}
    heavy = ""
    for _ in range(args.runs):  # interleaved: load drifts hit every measurement
        times["--space nope"].append(timed(["search/run.py", "--space", "nope"]))
        times["--help"].append(timed(["search/run.py", "--help"]))
        out = subprocess.run([sys.executable, __file__, "--to-connect"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
        times["to connect"].append(float(out[1]))
        heavy = out[2] if len(out) > 2 else ""
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end")
    for name, values in times.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:13s} median {statistics.median(values):.2f} s  runs {runs}")
    print(f"heavy modules imported at connect: {heavy or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
