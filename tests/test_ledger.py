"""The trial ledger (search.ledger) and what rests on it: one status decided in one place, ends
written once, resumes that never unpickle what a sweep folder holds, one driver per sweep, and
failures that end in one line.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from results.mlflow_logging import local_tracking_uri
from search.ledger import ORDER, Ledger, LedgerError, Status, end_status
from search.optuna_adapter import live_trial
from search.run import main
from search.sweep import _sweep_status

REPO = Path(__file__).resolve().parents[1]
TINY = ["--space", "ce", "--epochs", "2", "--scheduler", "none", "--no-plots"]


# ---------------------------------------------------------------- the ledger itself
def test_one_status_order_and_one_decision() -> None:
    assert [s.value for s in ORDER] == ["completed", "stopped_early", "unfinished", "diverged",
                                        "failed"]
    assert end_status({"epoch": 3, "final": True}) is Status.COMPLETED
    assert end_status({"epoch": 2, "final": False}) is Status.STOPPED_EARLY
    assert end_status({"epoch": 2, "diverged": True, "final": True}) is Status.DIVERGED
    assert end_status({"epoch": 2, "final": True}, error=True) is Status.FAILED
    assert end_status(None) is Status.FAILED and end_status({}) is Status.FAILED


def test_the_first_end_written_is_final(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.start("a", 0, {"lr": 0.1}, {"trial": {"lr": 0.1}})
    ledger.start("a", 5, {"lr": 9.0}, {})  # a start is written once
    assert ledger.entry("a").status is Status.UNFINISHED
    assert ledger.end("a", {"epoch": 4, "final": True, "val_all": 0.5}) is Status.COMPLETED
    # the driver, later, saw the trial stop: the trial's own end stays
    assert ledger.end("a", {"epoch": 4}, error="late", failed=True) is Status.COMPLETED
    entry = ledger.entry("a")
    assert (entry.number, entry.params, entry.value, entry.error) == (0, {"lr": 0.1}, 0.5, None)
    assert [p.name for p in (tmp_path / "trials" / "a").iterdir()] != []
    assert not list((tmp_path / "trials").rglob("*.tmp"))  # atomic: no partial file left


def test_a_ledger_file_that_does_not_parse_is_one_error_naming_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.start("a", 0, {}, {})
    (ledger.folder / "a" / "end.json").write_text("{not json")
    with pytest.raises(LedgerError, match=r"trials/a/end.json cannot be read"):
        ledger.entries()
    (ledger.folder / "a" / "end.json").write_text('{"status": "exploded", "result": {}}')
    with pytest.raises(LedgerError, match=r"trials/a/end.json"):
        ledger.entries()


def test_a_sweep_whose_every_trial_failed_is_failed_not_completed(tmp_path: Path) -> None:
    from search.callbacks import StopAll

    ledger = Ledger(tmp_path)
    for number, key in enumerate("ab"):
        ledger.start(key, number, {}, {})
        ledger.end(key, {"epoch": 1}, error="Traceback ...\nOSError: cannot write", failed=True)
    status, reason = _sweep_status(ledger.entries(), 2, StopAll())
    assert status == "failed" and reason.endswith("OSError: cannot write")
    ledger.start("c", 2, {}, {})
    ledger.end("c", {"epoch": 2, "final": True, "val_all": 0.3})
    assert _sweep_status(ledger.entries(), 3, StopAll()) == ("completed", None)


def test_optuna_internals_the_adapter_uses() -> None:
    """search.optuna_adapter reaches past Optuna's public API in one place: a live handle on a
    RUNNING trial an earlier driver asked. If this fails, Optuna changed that internal."""
    study = optuna.create_study()
    asked = study.ask()
    asked.suggest_float("x", 0.0, 1.0)
    (frozen,) = study.get_trials(deepcopy=False)
    assert hasattr(frozen, "_trial_id"), "optuna.FrozenTrial lost _trial_id"
    handle = live_trial(study, frozen)
    assert handle.number == frozen.number
    assert handle.suggest_float("x", 0.0, 1.0) == asked.params["x"]  # the stored value
    handle.report(0.5, 3)
    handle.set_user_attr("k", "v")
    (frozen,) = study.get_trials(deepcopy=False)
    assert frozen.intermediate_values == {3: 0.5} and frozen.user_attrs == {"k": "v"}
    study.tell(frozen.number, 0.7)
    with pytest.raises(ValueError, match="not RUNNING"):
        live_trial(study, study.trials[0])


# ---------------------------------------------------------------- sweeps
def _run(storage: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "search/run.py", "--storage", str(storage),
                           "--name", name, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


class _Payload:
    """What an attacker writes into a sweep folder: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_resume_never_unpickles_what_a_sweep_folder_holds(tmp_path: Path) -> None:
    storage, name = tmp_path / "runs", "crafted"
    first = _run(storage, name, *TINY, "--num-samples", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    sweep = storage / name
    ledger = Ledger(sweep)
    (entry, other) = ledger.entries()
    # One trial made unfinished again, so the resume runs it (and reads its checkpoint).
    (ledger.folder / entry.key / "end.json").unlink()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    planted = [sweep / "tune" / "tuner.pkl", sweep / "tune" / "searcher-state-0.pkl",
               sweep / "tune" / "trainable.pkl", sweep / "evil.pkl",
               ledger.checkpoint_path(entry.key), ledger.checkpoint_path(other.key)]
    planted += list((storage / "stage1_cache").rglob("*.pt"))
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    assert len(planted) > 6  # a stage-1 cache entry was planted too

    resumed = _run(storage, name, "--resume")
    assert not marker.exists(), "a pickle from the sweep folder was loaded"
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    entries = ledger.entries()
    assert [e.status for e in entries] == [Status.COMPLETED, Status.COMPLETED]
    assert ledger.entry(entry.key).result["resumed_from_epoch"] == 0  # trained from scratch


@pytest.mark.slow
def test_a_second_driver_on_the_same_sweep_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two drivers started together with one --name (both pass the name check): exactly one
    runs. A --resume while it runs is refused too. Before the lock both ran, shared one parent
    run and ended with 4 trials for --num-samples 3."""
    storage, name = tmp_path / "runs", "owned"
    command = [sys.executable, "search/run.py", "--storage", str(storage), "--name", name,
               "--space", "ce", "--epochs", "30", "--num-samples", "3", "--scheduler", "none",
               "--no-plots"]
    drivers = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
               for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while all(d.poll() is None for d in drivers):
            assert time.monotonic() < deadline, "neither driver was refused"
            time.sleep(0.1)
        (refused,) = [d for d in drivers if d.poll() is not None]
        (running,) = [d for d in drivers if d is not refused]
        _, err = refused.communicate()
        lines = err.strip().splitlines()
        assert refused.returncode == 2, err
        # "(pid N)", or "(another process)" when the winner holds the lock but has not yet
        # written its pid into it (search.plan.claim_sweep)
        assert len(lines) == 1 and ("is being run by another driver (" in lines[0]
                                    or "already exists" in lines[0]), lines
        while not Ledger(storage / name).folder.exists():  # the survivor runs trials
            assert running.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        resumed = _run(storage, name, "--resume")
        lines = resumed.stderr.strip().splitlines()
        assert resumed.returncode == 2, resumed.stderr
        assert len(lines) == 1 and "is being run by another driver (pid " in lines[0], lines
        os.killpg(running.pid, signal.SIGINT)
        assert running.wait(timeout=120) == 1
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    # the refused drivers wrote nothing: one parent run, the surviving driver's trials only
    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("tailtune")
    parents = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'sweep'")
    assert len(parents) == 1
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    entries = Ledger(storage / name).entries()
    assert len(study.trials) == len(entries) <= 3


@pytest.mark.slow
def test_damaged_sweep_files_on_resume_give_one_line(tmp_path: Path, capsys) -> None:
    storage, name = tmp_path / "runs", "damaged"
    assert main(["--storage", str(storage), "--name", name, *TINY, "--num-samples", "2"]) == 0
    capsys.readouterr()
    sweep = storage / name
    ledger = Ledger(sweep)
    keys = [e.key for e in ledger.entries()]

    # a ledger file that does not parse
    end = ledger.folder / keys[0] / "end.json"
    kept = end.read_bytes()
    end.write_text("garbage")
    assert main(["--storage", str(storage), "--name", name, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{end} cannot be read" in err[0], err
    end.write_bytes(kept)

    # a study database that is not one
    study = sweep / "optuna.db"
    kept = study.read_bytes()
    study.write_bytes(b"\x00garbage" * 100)
    assert main(["--storage", str(storage), "--name", name, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the sweep's Optuna study" in err[0], err
    assert study.read_bytes() == b"\x00garbage" * 100  # left as it was, for the user to see
    study.write_bytes(kept)

    # deleted checkpoints: the unfinished trial trains again from its first epoch
    (ledger.folder / keys[1] / "end.json").unlink()
    for path in ledger.folder.glob("*/checkpoint.pt"):
        path.unlink()
    assert main(["--storage", str(storage), "--name", name, "--resume"]) == 0
    assert [e.status for e in ledger.entries()] == [Status.COMPLETED] * 2


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_exits_1_and_says_why(tmp_path: Path, capsys) -> None:
    storage, name = tmp_path / "runs", "doomed"
    storage.mkdir()
    (storage / "stage1_cache").write_text("a file where the trials keep their stage 1")
    code = main(["--storage", str(storage), "--name", name, *TINY, "--num-samples", "2",
                 "--max-failures", "0"])
    out = capsys.readouterr().out
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("Sweep failed: every trial failed; the first: "), last
    assert "Error" in last
    assert [e.status for e in Ledger(storage / name).entries()] == [Status.FAILED] * 2
    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("tailtune")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'sweep'")
    assert (parent.info.status, parent.data.tags["tailtune.status"]) == ("FAILED", "failed")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB file system of its own (tmpfs), so that the test can fill it."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_mid_sweep_ends_in_one_reason_and_a_resume_that_loses_nothing(
        small_disk: Path) -> None:
    storage, name = small_disk / "runs", "full"
    proc = subprocess.Popen(
        [sys.executable, "search/run.py", "--storage", str(storage), "--name", name,
         "--space", "ce", "--epochs", "40", "--num-samples", "2", "--scheduler", "none",
         "--checkpoint-interval", "0", "--no-plots"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(Ledger(storage / name).folder.glob("*/checkpoint.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        filler = _fill(small_disk)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    printed = (out + err).strip().splitlines()
    assert proc.returncode == 1, "\n".join(printed[-40:])
    assert out.strip().splitlines()[-1].startswith(
        f"Sweep interrupted: continue it with: python search/run.py --resume --name {name}"
    ), "\n".join(printed)
    assert any("disk is full" in line or "No space left" in line for line in printed)
    assert "Traceback" not in out + err and len(printed) < 40, "\n".join(printed)

    filler.unlink()
    resumed = _run(storage, name, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    entries = Ledger(storage / name).entries()
    assert [e.status for e in entries] == [Status.COMPLETED] * 2
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("tailtune")
    children = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'")
    assert sorted((r.info.status, r.data.tags["tailtune.status"]) for r in children) == [
        ("FINISHED", "completed")] * 2


def test_the_sweep_report_and_the_leaderboard_rank_statuses_in_the_ledger_order() -> None:
    from results.leaderboard import _status_rank
    from search.summary import TrialRow, rank

    tags = ["failed", "diverged", "interrupted", "stopped_early", "completed", "running"]
    assert sorted(tags, key=_status_rank) == ["completed", "stopped_early", "interrupted",
                                              "running", "diverged", "failed"]
    rows = [TrialRow(status.value, status, 1, 1, {"all": 0.5}, {}) for status in reversed(ORDER)]
    assert [row.status for row in rank(rows)] == list(ORDER)
