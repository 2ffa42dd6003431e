"""Kill the driver at random moments, sometimes kill the resume too, resume, check nothing lost.

Not collected by pytest (a few minutes per round on 2 cores); run by hand after touching the
resume path. test_fault_tolerance.py pins the moments that once broke; this looks for new ones.

    python tests/stress_resume.py --rounds 12 --seed 1

Each round: a 4-trial x 6-epoch ce sweep on digits_lt, SIGKILL, SIGINT or SIGTERM to its process
group at a random offset after Tune's tuner.pkl appears (0-14 s: before Tune's first snapshot,
while trials are asked, start on reused actors, train and end), half the time to a --resume too,
then a final --resume that must end with exactly 4 trials in the ledger, Optuna and MLflow, all
completed, every epoch logged once. A driver that was signalled, not killed, must not claim a
sweep completed that was not (exit 0 with fewer than 4 end records).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_fault_tolerance as ft  # noqa: E402  (its helpers drive and check the sweeps)

SAMPLES, EPOCHS = 4, 6
FIRST = ["--space", "ce", "--epochs", str(EPOCHS), "--num-samples", str(SAMPLES),
         "--max-concurrent", "2", "--scheduler", "none", "--checkpoint-interval", "0"]


SIGNALS = [signal.SIGKILL, signal.SIGINT, signal.SIGTERM]


def _kill_after(proc: subprocess.Popen, tune_dir: Path, offset: float, sig: int) -> int:
    """Send `sig` `offset` s after tuner.pkl appears; the driver's exit code."""
    began = time.monotonic()
    while (not (tune_dir / "tuner.pkl").exists() and proc.poll() is None
           and time.monotonic() - began < 120):
        time.sleep(0.02)
    time.sleep(offset)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _false_completion(code: int, sig: int, records: int) -> str | None:
    if sig != signal.SIGKILL and code == 0 and records < SAMPLES:
        return f"{sig.name}: exit 0 with {records} of {SAMPLES} trials ended"
    return None


def one_round(folder: Path, rng: random.Random) -> tuple[str, str | None]:
    """(what was done, None or why it failed)."""
    storage, name, marker = folder / "runs", "stress", uuid.uuid4().hex
    tune_dir = storage / name / "tune"
    offset, sig = rng.uniform(0, 14), rng.choice(SIGNALS)
    code = _kill_after(ft._start(ft._command(storage, name, *FIRST), folder / "first.log",
                                 marker), tune_dir, offset, sig)
    done = f"{sig.name} at +{offset:.1f} s"
    false_end = _false_completion(code, sig, len(ft._records(storage, name)))
    if rng.random() < 0.5:
        time.sleep(2)
        offset, sig = rng.uniform(0, 10), rng.choice(SIGNALS)
        code = _kill_after(ft._start(ft._command(storage, name, "--resume"),
                                     folder / "second.log", marker), tune_dir, offset, sig)
        done += f", resume {sig.name} at +{offset:.1f} s"
        false_end = false_end or _false_completion(code, sig, len(ft._records(storage, name)))
    time.sleep(2)
    final = subprocess.run(ft._command(storage, name, "--resume"), cwd=ft.REPO,
                           env=ft._env(marker), capture_output=True, text=True, timeout=600)
    (folder / "final.log").write_text(final.stdout + final.stderr)
    try:
        assert false_end is None, false_end
        assert final.returncode == 0, final.stdout[-1500:] + final.stderr[-1500:]
        ft._assert_exact(storage, name, SAMPLES, EPOCHS)
    except AssertionError as exc:
        return done, str(exc)[-1500:]
    return done, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="tailtune-stress-"))
    failed = 0
    for index in range(args.rounds):
        folder = root / f"round-{index}"
        folder.mkdir()
        done, failure = one_round(folder, rng)
        failed += failure is not None
        print(f"round {index} ({done}): {'FAIL ' + failure if failure else 'ok'}", flush=True)
    print(f"{args.rounds - failed}/{args.rounds} rounds ended exact; logs in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
