"""The throughput benchmark runs end to end on tiny data (plumbing only; no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
RATE = r"([0-9.]+) images/s"


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=300,
        # one intra-op thread: on a busy 2-core machine two threads spin against each other
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_prints_both_rates_and_their_ratio() -> None:
    done = run_benchmark(
        "--images", "128", "--batch-size", "16", "--steps", "2", "--warmup", "1", "--json"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    resident = float(re.search(rf"^device-resident: {RATE}", out, re.M).group(1))
    reference = float(re.search(rf"^reference \(DataLoader, 2 workers\): {RATE}", out, re.M)[1])
    ratio = float(re.search(r"^ratio \(device-resident / reference\): ([0-9.]+)x", out, re.M)[1])
    assert resident > 0 and reference > 0 and ratio > 0
    assert re.search(
        r"^machine: .+, \d+ CPUs, 1 torch threads, torch \S+, batch 16, 128 images", out, re.M
    )
    record = json.loads(out.strip().splitlines()[-1])
    assert record["mode"] == "ratio" and record["device"] == "cpu"
    assert record["steps"] == 2 and record["batch_size"] == 16 and record["images"] == 128
    assert record["ratio"] == pytest.approx(
        record["device_resident_images_per_s"] / record["reference_images_per_s"]
    )


def test_full_stage1_runs_the_pipeline(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    done = run_benchmark(
        "--full-stage1", "--images", "64", "--batch-size", "32", "--epochs", "1",
        "--json", str(log),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "full stage 1 (1 epochs, 64 images): wall " in done.stdout
    record = json.loads(log.read_text().strip())
    assert record["mode"] == "full_stage1" and record["status"] == "completed"
    assert record["epochs"] == 1
    assert 0 < record["train_seconds"] <= record["wall_seconds"]


def load_script() -> ModuleType:
    # benchmarks/ is not a package: load the script as a module to call main() in-process
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_script().main(["--steps", "0"])
    assert exited.value.code == 2
    assert "--steps: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "device cuda" in err
