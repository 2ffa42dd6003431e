"""The real-data benchmark runs end to end at toy size and resumes without re-running a unit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.datasets.fashion_mnist import SYSTEM_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_data.py"


def run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--benchmarks", "fashion", "--out", str(out),
         "--rows", "fashion:ce,fashion:sweep:dro_wb", "--epochs", "3", "--n-max", "200",
         "--trials", "2", "--seeds", "1"],
        capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(),
                    reason=f"Fashion-MNIST is not installed ({SYSTEM_DIR}: apt-get install "
                           "dataset-fashion-mnist)")
def test_the_real_data_benchmark_runs_a_baseline_and_a_sweep_and_resumes(tmp_path):
    first = run(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    ledger = tmp_path / "real_data" / "units.jsonl"
    units = [json.loads(line) for line in ledger.read_text().splitlines()]
    keys = [unit["key"] for unit in units]
    assert sorted(keys) == ["fashion:ce:seed1", "fashion:sweep:dro_wb",
                            "fashion:sweep:dro_wb:seed1"]
    sweep = next(unit for unit in units if unit["kind"] == "sweep")
    assert sum(sweep["trials"].values()) == 2
    rerun = next(unit for unit in units if unit["key"] == "fashion:sweep:dro_wb:seed1")
    # the re-run trains the configuration the sweep chose, with a fresh seed
    chosen = {k: v for k, v in sweep["best_config"].items()
              if k not in ("seed", "data_dir", "download", "device")}
    assert {k: rerun["config"][k] for k in chosen} == chosen and rerun["config"]["seed"] == 1
    table = (tmp_path / "real_data.md").read_text()
    assert "| ce | 1/1 |" in table and "| sweep:dro_wb | 1/1 |" in table
    assert "| wb_paper | 0/1 |" in table  # a row not asked for stays unmeasured, not filled in

    again = run(tmp_path)  # everything is in the ledger: nothing runs again
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done " not in again.stdout
    assert len(ledger.read_text().splitlines()) == 3
