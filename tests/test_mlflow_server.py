"""A real `mlflow server` on loopback: a sweep recorded through it, read back through it.

This is the cluster setup (many writers, one server): the trials' records and artifacts (the
per-trial plots included) go over HTTP, and the leaderboard and report read them with
--mlflow-uri http://127.0.0.1:PORT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from results.leaderboard import main as leaderboard_main
from results.mlflow_logging import SweepRecorder
from results.plots import log_trial_plots
from results.report import main as report_main
from trainables.config import TrialConfig
from trainables.pipeline import run_trial

EXPERIMENT = "served"
TRIALS = {"t-fast": 0.05, "t-slow": 0.005}  # trial id -> learning rate
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {seconds} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """End the server and the uvicorn worker it started: its own process group, by id."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:  # whatever of the group outlived the grace period
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = folder / "server.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_cli), "server", "--backend-store-uri",
               f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--serve-artifacts",
               "--artifacts-destination", str(folder / "mlartifacts")]
    # No background job runner (a dozen huey worker processes on a 2-core machine) and no
    # telemetry: the test needs the tracking API and the artifact proxy only.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def sweep(server: str) -> str:
    """Two real trials of the pipeline recorded through the server, with their plots."""
    tags = {"space": "ce", "dataset": "digits_lt", "seed": 0, "imbalance": 10.0,
            "protocol": "holdout", "method": "ce"}
    recorder = SweepRecorder(server, EXPERIMENT, "served-sweep", tags)
    recorder.start({"space": "ce", "num_samples": len(TRIALS)})
    for trial_id, lr in TRIALS.items():
        config = TrialConfig.from_dict({"dataset": "digits_lt", "epochs": 2, "lr": lr,
                                        "warmup_epochs": 1, "batch_size": 64,
                                        "device": "cpu"}).to_dict()
        run_id = recorder.trial_run(trial_id, config)
        outcome = run_trial(config, lambda m, _s, t=trial_id: recorder.log_epoch(t, m))
        recorder.finish_trial(trial_id, "completed", outcome["history"][-1], outcome)
        log_trial_plots(recorder.client, run_id, outcome)
    recorder.finish("completed")
    return server


def _rank(run) -> tuple[float, int]:
    """Best validation accuracy first; on a tie, the trial that started first."""
    return -run.data.metrics["val_all"], run.info.start_time


def test_leaderboard_reads_the_sweep_through_the_server(sweep: str, capsys) -> None:
    code = leaderboard_main(["--mlflow-uri", sweep, "--experiment", EXPERIMENT,
                             "--format", "csv"])
    out = capsys.readouterr()
    assert code == 0, out.err
    board = pd.read_csv(StringIO(out.out))
    client = MlflowClient(sweep)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'")
    truth = sorted(runs, key=_rank)
    assert list(board["run_ids"]) == [r.info.run_id for r in truth]
    assert list(board["trial"]) == [r.data.tags["tailtune.trial_id"] for r in truth]
    for metric in ("val_all", "val_medium", "test_all", "test_few"):
        assert list(board[metric]) == pytest.approx([r.data.metrics[metric] for r in truth])
    assert set(board["sweep"]) == {"served-sweep"} and list(board["rank"]) == [1, 2]


def test_artifacts_and_plots_are_served(sweep: str, tmp_path: Path) -> None:
    client = MlflowClient(sweep)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    for run in client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'"):
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "per_class.csv", "diagnostics.json", "plots"} <= top
        plots = client.download_artifacts(run.info.run_id, "plots", str(tmp_path))
        names = sorted(p.name for p in Path(plots).iterdir())
        assert names == ["learning_curves.png", "per_class_accuracy.png", "weight_norms.png"]
        assert all(p.stat().st_size > 10_000 for p in Path(plots).iterdir())


def test_report_through_the_server(sweep: str, tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    assert report_main(["--mlflow-uri", sweep, "--experiment", EXPERIMENT,
                        "--output", str(target)]) == 0
    client = MlflowClient(sweep)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'")
    best = sorted(runs, key=_rank)[0]
    line = next(row for row in target.read_text().splitlines()
                if "(`ce`)" in row and "served-sweep" in row)
    assert f"served-sweep/{best.data.tags['tailtune.trial_id']}" in line
    assert f"{best.data.metrics['test_all'] * 100:.2f}" in line
