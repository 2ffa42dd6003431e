"""The leaderboard against a real MLflow store filled by real sweeps.

One module-scoped store: a sweep of the real CLI (search/run.py, space ce on digits_lt at its
imbalance factor 10, local Ray), plus sweeps recorded the way the sweep callback records them
(results.mlflow_logging.SweepRecorder around the real pipeline, in this process: a second Ray
sweep would double the test's time) for what a tiny sweep does not produce reliably: another
space (wb) at imbalance factor 20, one configuration trained with seeds 0 and 1, a trial stopped
early, a failed trial and a paper-protocol trial. Every expectation is read back from the store
with MlflowClient, never hard-coded.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from results.leaderboard import (
    PAPER_LABEL,
    compare,
    leaderboard,
    load_trials,
    main,
    select_trials,
)
from results.mlflow_logging import SweepRecorder, local_tracking_uri
from trainables.config import TrialConfig
from trainables.pipeline import run_trial

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "lb-test"
FIXED = {"dataset": "digits_lt", "method": "ce", "epochs": 2, "batch_size": 64,
         "warmup_epochs": 1, "lr": 0.05, "weight_decay": 5e-4, "device": "cpu"}

pytestmark = pytest.mark.slow


class _Stopped(Exception):
    """What ASHA does to a trial: it is not continued after this epoch."""


def _record(recorder: SweepRecorder, trial_id: str, config: dict, stop_after: int = 0,
            crash_after: int = 0) -> None:
    """Train one trial with the real pipeline and record it as MlflowSweepCallback does."""
    full = TrialConfig.from_dict(config).to_dict()
    recorder.trial_run(trial_id, full)
    last: dict = {}

    def on_epoch(metrics: dict, snapshot) -> None:
        last.clear()
        last.update(metrics)
        recorder.log_epoch(trial_id, metrics)
        if stop_after and metrics["epoch"] >= stop_after:
            raise _Stopped
        if crash_after and metrics["epoch"] >= crash_after:
            raise RuntimeError("trial crashed (injected after its first epoch)")

    try:
        outcome = run_trial(full, on_epoch)
    except _Stopped:
        recorder.finish_trial(trial_id, "stopped_early", last)
    except RuntimeError as exc:
        recorder.finish_trial(trial_id, "failed", last, error=str(exc))
    else:
        recorder.finish_trial(trial_id, "completed", last, outcome)


def _recorded_sweep(uri: str, name: str, seed: int, protocol: str, trials: list,
                    space: str = "ce", imbalance: float = 10.0) -> None:
    """The records search/sweep.py makes: parent run with the sweep's tags, a child per trial."""
    tags = {"space": space, "dataset": "digits_lt", "seed": seed, "imbalance": imbalance,
            "protocol": protocol, "method": space}
    recorder = SweepRecorder(uri, EXPERIMENT, name, tags)
    recorder.start({"space": space, "seed": seed, "num_samples": len(trials)})
    for trial_id, config, kwargs in trials:
        config = {**config, "seed": seed, "protocol": protocol, "method": space}
        if imbalance != 10.0:
            config["imbalance"] = imbalance
        _record(recorder, trial_id, config, **kwargs)
    recorder.finish("completed")


def _cli_sweep(storage: Path, name: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / "search" / "run.py"), "--num-samples", "3",
               "--epochs", "2", "--max-concurrent", "2", "--storage", str(storage),
               "--experiment", EXPERIMENT, "--name", name, *args]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(command, cwd=storage, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("lb_store")
    _cli_sweep(storage, "ce-a", "--space", "ce", "--scheduler", "none")
    uri = local_tracking_uri(storage)
    wb = {**FIXED, "epochs": 1, "cls_epochs": 1, "schedule": "cosine"}
    _recorded_sweep(uri, "wb-b", 0, "holdout", [
        ("wb1", {**wb, "cls_lr": 0.01, "maxnorm": "step"}, {}),
        ("wb2", {**wb, "cls_lr": 0.05, "maxnorm": "off"}, {}),
    ], space="wb", imbalance=20.0)
    _recorded_sweep(uri, "ce-seed0", 0, "holdout", [
        ("fixed", FIXED, {}),
        ("stopped", {**FIXED, "lr": 0.02}, {"stop_after": 1}),
        ("crashed", {**FIXED, "lr": 0.01}, {"crash_after": 1}),
    ])
    _recorded_sweep(uri, "ce-seed1", 1, "holdout", [("fixed", FIXED, {})])
    _recorded_sweep(uri, "ce-paper", 0, "paper", [("paper", FIXED, {})])
    return storage


@pytest.fixture(scope="module")
def runs(store: Path) -> list:
    """The trial runs as MLflow returns them: the ground truth of every test."""
    client = MlflowClient(local_tracking_uri(store))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return list(client.search_runs([experiment.experiment_id],
                                   "tags.`tailtune.role` = 'trial'", max_results=1000))


def _cli(store: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["--storage", str(store), "--experiment", EXPERIMENT, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _tag(run, name: str) -> str:
    return run.data.tags[f"tailtune.{name}"]


def test_store_holds_what_the_sweeps_did(runs: list) -> None:
    statuses = {_tag(r, "sweep") + "/" + _tag(r, "trial_id"): _tag(r, "status") for r in runs}
    assert sum(k.startswith("ce-a/") for k in statuses) == 3
    assert sum(k.startswith("wb-b/") for k in statuses) == 2
    assert statuses["ce-seed0/stopped"] == "stopped_early"
    assert statuses["ce-seed0/crashed"] == "failed"
    assert statuses["ce-seed0/fixed"] == statuses["ce-seed1/fixed"] == "completed"


def test_rows_grouping_and_ordering_match_the_store(store: Path, runs: list) -> None:
    trials = select_trials(load_trials(local_tracking_uri(store), EXPERIMENT))
    board = leaderboard(trials, "sweep", top=10)
    shown = [r for r in runs if _tag(r, "status") in ("completed", "diverged")]
    # one row per trial (no two trials of one sweep share a configuration), all of them shown
    assert sorted(board["run_ids"]) == sorted(r.info.run_id for r in shown)
    by_id = {r.info.run_id: r for r in shown}
    for _, row in board.iterrows():
        run = by_id[row["run_ids"]]
        assert row["sweep"] == _tag(run, "sweep")
        assert row["dataset"] == _tag(run, "dataset")
        assert row["imbalance"] == float(_tag(run, "imbalance"))
        assert row["protocol"] == _tag(run, "protocol")
        for metric in ("val_all", "val_many", "val_medium", "val_few", "test_all", "test_many",
                       "test_medium", "test_few"):
            expected = run.data.metrics.get(metric, math.nan)
            assert row[metric] == pytest.approx(expected, nan_ok=True), metric
    groups = board.groupby(["sweep", "dataset", "imbalance", "protocol"], sort=False)
    assert {k[0]: k[2] for k in groups.groups} == {
        "ce-a": 10.0, "wb-b": 20.0, "ce-seed0": 10.0, "ce-seed1": 10.0, "ce-paper": 10.0}
    for _, group in groups:
        assert list(group["rank"]) == list(range(1, len(group) + 1))
        values = list(group["val_all"])
        assert values == sorted(values, reverse=True)  # ranked by validation, never by test
    # the wb sweep's searched dimensions are its hyperparameter columns
    for _, wb_row in board[board["sweep"] == "wb-b"].iterrows():
        assert {"lr", "weight_decay", "cls_lr", "cls_weight_decay", "maxnorm"} <= set(
            wb_row["hyperparameters"])
        run = by_id[wb_row["run_ids"]]
        for name in ("cls_lr", "maxnorm"):
            assert str(wb_row["hyperparameters"][name]) == run.data.params[name]


def test_top_limits_rows_per_group(store: Path) -> None:
    trials = select_trials(load_trials(local_tracking_uri(store), EXPERIMENT))
    board = leaderboard(trials, "sweep", top=2)
    sizes = board.groupby("sweep").size()
    assert sizes["ce-a"] == 2 and sizes["wb-b"] == 2 and sizes["ce-seed1"] == 1
    assert leaderboard(trials, "sweep", top=1).groupby("sweep").size().max() == 1
    full = leaderboard(trials, "sweep", top=10)
    best = full[full["rank"] <= 2]
    assert sorted(board["run_ids"]) == sorted(best["run_ids"])


def test_stopped_and_failed_trials_only_when_asked(store: Path, runs: list,
                                                   capsys: pytest.CaptureFixture) -> None:
    ids = {_tag(r, "trial_id"): r.info.run_id for r in runs if _tag(r, "sweep") == "ce-seed0"}
    code, out, _ = _cli(store, "--format", "csv", capsys=capsys)
    shown = " ".join(pd.read_csv(StringIO(out))["run_ids"])
    assert code == 0 and ids["fixed"] in shown
    assert ids["stopped"] not in shown and ids["crashed"] not in shown
    code, out, _ = _cli(store, "--format", "csv", "--include", "stopped_early,failed",
                        capsys=capsys)
    board = pd.read_csv(StringIO(out))
    group = board[board["sweep"] == "ce-seed0"]
    assert list(group["status"]) == ["completed", "stopped_early", "failed"]
    # the stopped trial's row shows what it reached before it was stopped, and no test accuracy
    stopped = next(r for r in runs if r.info.run_id == ids["stopped"])
    row = group[group["status"] == "stopped_early"].iloc[0]
    assert row["val_all"] == pytest.approx(stopped.data.metrics["val_all"])
    assert math.isnan(row["test_all"]) and "test_all" not in stopped.data.metrics
    assert row["epochs_run"] == stopped.data.metrics["epochs_run"] == 1
    assert row["total_epochs"] == int(stopped.data.params["epochs"]) == 2
    _, out, _ = _cli(store, capsys=capsys)
    note = next(line for line in out.splitlines() if line.startswith("Not shown:"))
    assert "1 stopped_early" in note and "1 failed" in note


def test_same_configuration_with_several_seeds_is_one_row(store: Path, runs: list) -> None:
    trials = select_trials(load_trials(local_tracking_uri(store), EXPERIMENT))
    board = leaderboard(trials[trials["protocol"] == "holdout"], "space", top=10)
    row = board[(board["space"] == "ce") & (board["runs"] == 2)].iloc[0]
    seeded = [r for r in runs if _tag(r, "trial_id") == "fixed"
              and _tag(r, "protocol") == "holdout"]
    assert sorted(r.info.run_id for r in seeded) == sorted(row["run_ids"].split())
    assert row["seeds"] == "0,1" and row["trial"] == "ce-seed0/fixed+ce-seed1/fixed"
    for metric in ("val_all", "test_all", "test_few"):
        values = [r.data.metrics[metric] for r in seeded]
        assert row[metric] == pytest.approx(statistics.mean(values))
        assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
    # the ce space's group holds ce-a's trials too, ranked together by validation accuracy
    group = board[board["space"] == "ce"]
    assert len(group) == 4 and list(group["val_all"]) == sorted(group["val_all"], reverse=True)


def test_compare_sweeps_and_spaces_side_by_side(store: Path, capsys) -> None:
    everything = load_trials(local_tracking_uri(store), EXPERIMENT)
    trials = select_trials(everything)
    table = compare(trials, ["ce-a", "wb-b"], top=3, everything=everything)
    # different imbalance factors: each sweep fills its own rows, the other's cells are empty
    for name, factor in (("ce-a", 10.0), ("wb-b", 20.0)):
        own = table[table["imbalance"] == factor]
        alone = leaderboard(trials[trials["sweep"] == name], "sweep", top=3)
        assert list(own[f"{name}: val_all"]) == list(alone["val_all"])
        assert list(own[f"{name}: trial"]) == list(alone["trial"])
    assert table[table["imbalance"] == 10.0]["wb-b: val_all"].isna().all()
    # spaces: same dataset and factor, so the columns line up rank by rank
    spaces = compare(trials[trials["imbalance"] == 10.0], ["ce", "wb"], top=3,
                     everything=everything)
    assert spaces["wb: val_all"].isna().all()
    assert all("/" in label for label in spaces["ce: trial"])  # a space spans sweeps
    code, out, _ = _cli(store, "--compare", "ce-a", "ce-seed0", "--format", "csv", capsys=capsys)
    side = pd.read_csv(StringIO(out))
    assert code == 0 and list(side["rank"]) == [1, 2, 3]
    assert side["ce-seed0: val_all"].notna().sum() == 1  # its stopped and failed trials hidden
    assert side["ce-a: val_all"].notna().sum() == 3


@pytest.mark.parametrize("fmt", ["table", "csv", "markdown", "html"])
def test_every_output_format_holds_the_rows(store: Path, fmt: str, tmp_path: Path,
                                            capsys) -> None:
    trials = select_trials(load_trials(local_tracking_uri(store), EXPERIMENT))
    board = leaderboard(trials, "sweep", top=5)
    target = tmp_path / f"board.{fmt}"
    code, out, err = _cli(store, "--format", fmt, "--output", str(target), capsys=capsys)
    assert code == 0 and out == "" and err == ""
    text = target.read_text()
    if fmt == "csv":
        parsed = pd.read_csv(StringIO(text))
        assert list(parsed["run_ids"]) == list(board["run_ids"])
        assert list(parsed["val_all"]) == pytest.approx(list(board["val_all"]))
        return
    rows = _rows(text, fmt)
    assert len(rows) == len(board)
    for cells, (_, row) in zip(rows, board.iterrows(), strict=True):
        assert row["trial"] in cells
        assert f"{row['val_all'] * 100:.2f}" in cells
        assert f"{row['test_all'] * 100:.2f}" in cells
        label = PAPER_LABEL if row["protocol"] == "paper" else "holdout"
        assert label in cells
    assert "test set" in text.lower()  # the paper-protocol note


def _rows(text: str, fmt: str) -> list[list[str]]:
    """Data rows of a rendered table as lists of cell strings."""
    if fmt == "html":
        parser = _Cells()
        parser.feed(text)
        return parser.rows
    lines = text.splitlines()
    if fmt == "markdown":
        table = [line for line in lines if line.startswith("|")][2:]
        return [[c.strip() for c in line.strip("|").split("|")] for line in table]
    start = next(i for i, line in enumerate(lines) if line.startswith("---"))
    body = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        body.append([c for c in line.split("  ") if c.strip()])
    return [[c.strip() for c in cells] for cells in body]


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self.rows = [r for r in self.rows if r]  # the header row has th, not td

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.parametrize("args, fragment", [
    (["--experiment", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
    (["--include", "finished"], "--include 'finished' is not a trial status"),
    (["--compare", "ce-a", "nothing"], "--compare 'nothing' is neither a sweep nor a space"),
    (["--compare", "ce-a"], "--compare needs two or more"),
    (["--top", "0"], "--top must be an integer >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(store: Path, args: list, fragment: str,
                                          capsys) -> None:
    code = main(["--storage", str(store), "--experiment", EXPERIMENT, *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_missing_store_and_dead_server_exit_2(tmp_path: Path) -> None:
    script = str(ROOT / "results" / "leaderboard.py")
    missing = subprocess.run([sys.executable, script, "--storage", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no MLflow store at" in missing.stderr
    assert not (tmp_path / "none").exists()  # reading never creates a store
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = subprocess.run([sys.executable, script, "--mlflow-uri", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=300)
    assert dead.returncode == 2 and dead.stderr.count("\n") == 1
    assert f"http://127.0.0.1:{port}" in dead.stderr and "no server answers" in dead.stderr
