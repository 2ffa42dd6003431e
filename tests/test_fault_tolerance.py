"""Faults a long sweep meets, on real components: a trial's worker killed mid-trial, the driver
killed (SIGKILL) or interrupted (SIGINT) mid-sweep and resumed, a trial whose loss diverges, the
searcher's view of the study after a restart, and environments the sweep cannot use.

After every fault the sweep must end with exactly --num-samples trials in Tune, in the Optuna
study and in MLflow, none left RUNNING, each epoch logged once, and no trial that had ended
trained again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from processes import marked
from ray.tune.search import Searcher

from results.mlflow_logging import SweepRecorder, local_tracking_uri
from search.book import KEY, SweepBook
from search.ledger import Ledger
from search.optuna_search import LedgerSearch, tpe_sampler
from search.run import main
from spaces import Sampler, fixed_settings, get_space

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "tailtune"


# ---------------------------------------------------------------- helpers
def _env(marker: str = "") -> dict[str, str]:
    # The marker is inherited by every process the driver starts (Ray's included): how the test
    # tells them from other Ray processes on the machine.
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TAILTUNE_TEST_MARK": marker}


def _command(storage: Path, name: str, *args: str) -> list[str]:
    return [sys.executable, "search/run.py", "--storage", str(storage), "--name", name,
            "--no-plots", *args]


def _start(command: list[str], log: Path, marker: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=_env(marker), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition: Callable[[], object], proc: subprocess.Popen, log: Path,
              timeout: float = 240, poll_s: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy; fail if the sweep ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before the fault was "
                        f"injected:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)
    pytest.fail(f"timed out waiting for the sweep:\n{log.read_text()[-3000:]}")


def _records(storage: Path, name: str) -> dict[str, float]:
    """Trial key -> modification time of its ledger end (written once, when the trial ends)."""
    folder = Ledger(storage / name).folder
    return {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/end.json")}


def _marked_processes(marker: str, session: int | None = None) -> list[str]:
    """Live processes the driver started and left: carrying the marker, or in its session."""
    return [f"{pid} {command}" for pid, command in marked(marker, session).items()]


def _children(storage: Path) -> list:
    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'")


def _steps(client: MlflowClient, run_id: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp)
                  for m in client.get_metric_history(run_id, "val_all"))


def _snapshot_mlflow(storage: Path) -> dict[str, tuple]:
    """Trial key -> (status, end time, val_all history) of the runs that had ended."""
    client = MlflowClient(local_tracking_uri(storage))
    return {r.data.tags["tailtune.trial_id"]: (r.info.status, r.info.end_time,
                                               _steps(client, r.info.run_id))
            for r in _children(storage) if r.info.status == "FINISHED"}


def _assert_exact(storage: Path, name: str, num_samples: int, epochs: int) -> set[str]:
    """Exactly num_samples trials in the ledger (where Tune's trials end: each driver run is a
    fresh Tuner), Optuna and MLflow, all completed with every epoch logged once; returns the
    trial keys."""
    entries = Ledger(storage / name).entries()
    assert len(entries) == num_samples
    assert all(e.status == "completed" for e in entries)
    assert all(e.result["final"] and e.result["epoch"] == epochs for e in entries)
    keys = {e.key for e in entries}
    assert len(keys) == num_samples

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    assert len(study.trials) == num_samples
    assert {t.state.name for t in study.trials} == {"COMPLETE"}  # none RUNNING
    assert {t.user_attrs["tune_trial_id"] for t in study.trials} == keys

    client = MlflowClient(local_tracking_uri(storage))
    children = _children(storage)
    assert len(children) == num_samples
    assert {r.data.tags["tailtune.trial_id"] for r in children} == keys
    for run in children:
        assert (run.info.status, run.data.tags["tailtune.status"]) == ("FINISHED", "completed")
        steps = [step for step, _, _ in _steps(client, run.info.run_id)]
        assert steps == list(range(1, epochs + 1)), run.data.tags["tailtune.trial_id"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'sweep'")
    assert [(p.info.status, p.data.tags["tailtune.status"]) for p in parents] == [
        ("FINISHED", "completed")]
    return keys


def _interrupt_and_resume(tmp_path: Path, sig: int, samples: int = 3, epochs: int = 12,
                          when: Callable[[Path, str], object] | None = None,
                          group: bool = True, extra: tuple[str, ...] = ()) -> dict:
    """Start a sweep (with `extra` options), send `sig` to its whole process group (or, not
    `group`, to the driver alone) once `when(storage, name)` holds (default: a trial has
    ended), resume. Returns what the test needs to check; prints the resume's cost."""
    storage, name, marker = tmp_path / "runs", f"ft-{sig}", uuid.uuid4().hex
    first_log = tmp_path / "first.log"
    proc = _start(_command(storage, name, "--space", "ce", "--epochs", str(epochs),
                           "--num-samples", str(samples), "--max-concurrent", "2",
                           "--scheduler", "none", "--checkpoint-interval", "0", *extra),
                  first_log, marker)
    try:
        # A fine poll for a given moment: some last a fraction of a second.
        _wait_for(lambda: (when or _records)(storage, name), proc, first_log,
                  poll_s=0.2 if when is None else 0.01)
        (os.killpg if group else os.kill)(proc.pid, sig)
        first_code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    leftovers = _marked_processes(marker, proc.pid)
    deadline = time.monotonic() + 20  # workers notice their raylet's death within seconds
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = _marked_processes(marker, proc.pid)
    ledger = Ledger(storage / name)
    before = {"records": _records(storage, name), "mlflow": _snapshot_mlflow(storage),
              # unfinished trials (fused members too) with a checkpoint to continue from
              "checkpointed": sorted(entry.key for entry in ledger.entries() if (
                  not entry.status.ended and ledger.checkpoint_path(entry.key).exists())),
              "tune_snapshot": _has_experiment_state(storage / name / "tune"),
              "statuses": sorted((r.info.status, r.data.tags["tailtune.status"])
                                 for r in _children(storage))}
    began = time.monotonic()
    resumed = subprocess.run(_command(storage, name, "--resume"), cwd=REPO, env=_env(marker),
                             capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - began
    _print_resume(storage, name, sig, seconds, before)
    return {"storage": storage, "name": name, "first_code": first_code,
            "first_out": first_log.read_text(), "leftovers": leftovers, "before": before,
            "resumed": resumed, "samples": samples, "epochs": epochs}


def _print_resume(storage: Path, name: str, sig: int, seconds: float, before: dict) -> None:
    """What the resume cost and what it ran again (for the record, not asserted)."""
    done = []
    for entry in Ledger(storage / name).entries():
        key, last = entry.key, entry.result
        if key in before["records"]:
            done.append(f"{key} ended before: replayed")
        else:
            done.append(f"{key} trained epochs {last.get('resumed_from_epoch', 0) + 1}-"
                        f"{last.get('epoch')}")
    print(f"\nsignal {sig}: resume took {seconds:.1f} s; " + "; ".join(done))


def _assert_resumed_without_loss(run: dict, ended_before: bool = True) -> None:
    resumed = run["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Sweep {run['name']} completed" in resumed.stdout
    storage, name = run["storage"], run["name"]
    _assert_exact(storage, name, run["samples"], run["epochs"])
    # No trial that had ended trained again: its record (rewritten by a trial that trains to
    # its end) and its finished MLflow run (end time, every logged value) are untouched.
    after_records = _records(storage, name)
    for key, mtime in run["before"]["records"].items():
        assert after_records[key] == mtime, f"trial {key} ran again"
    after_mlflow = _snapshot_mlflow(storage)
    for key, finished in run["before"]["mlflow"].items():
        assert after_mlflow[key] == finished, f"the finished MLflow run of {key} changed"
    if ended_before:
        assert run["before"]["records"], "no trial had ended before the fault"


def _assert_continued_from_checkpoints(run: dict, fused: bool) -> None:
    """Trials (fused members too) that had a checkpoint at the fault continued from it: their
    ends say from which epoch. Fused, both groups train at once, so some member had one."""
    storage, name = run["storage"], run["name"]
    if fused:
        assert run["before"]["checkpointed"], "no unfinished member had a checkpoint"
    ledger = Ledger(storage / name)
    for key in run["before"]["checkpointed"]:
        assert ledger.entry(key).result.get("resumed_from_epoch", 0) > 0, key


# ---------------------------------------------------------------- the searcher after restarts
def _book(sweep: Path, name: str = "sweep") -> tuple[SweepBook, LedgerSearch]:
    """The driver's book and searcher over a real study, ledger and MLflow store, as a (new or
    resumed) driver builds them."""
    sweep.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}",
                                sampler=tpe_sampler(0, 3), direction="maximize",
                                load_if_exists=True)
    recorder = SweepRecorder(local_tracking_uri(sweep.parent), EXPERIMENT, name, {"space": "ce"})
    recorder.start({})
    book = SweepBook(Ledger(sweep), study, recorder,
                     Sampler("ce", fixed_settings(get_space("ce"), "digits_lt")))
    return book, LedgerSearch(book, num_samples=3, metric="val_all", mode="max")


def _final(value: float) -> dict:
    return {"val_all": value, "epoch": 3, "total_epochs": 3, "final": True, "diverged": False}


def _study_states(sweep: Path) -> list[tuple]:
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep / 'optuna.db'}")
    return [(t.user_attrs.get("tune_trial_id"), t.state.name, t.value) for t in study.trials]


def test_a_resumed_searcher_reissues_the_unfinished_trials_then_asks_new_ones(
        tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    book, searcher = _book(sweep)
    asked = {tid: searcher.suggest(tid) for tid in ("a", "b")}
    for tid, config in asked.items():
        book.started(tid, config["trial"])
    book.end("a", _final(0.4))
    # the driver dies here; --resume builds a new book and searcher (a fresh Tuner)
    book, searcher = _book(sweep)
    reissued = searcher.suggest("x")  # Tune's new trial continues b, under b's key
    assert reissued[KEY] == "b" and reissued["trial"] == asked["b"]["trial"]
    assert searcher.suggest("y")[KEY] == "y"  # then a new trial
    assert searcher.suggest("z") == Searcher.FINISHED  # num_samples trials asked: no more
    assert _study_states(sweep) == [("a", "COMPLETE", 0.4), ("b", "RUNNING", None),
                                    ("y", "RUNNING", None)]
    assert [e.key for e in Ledger(sweep).entries()] == ["a", "b", "y"]


def test_a_trial_half_asked_when_the_driver_died_is_adopted_and_completed(
        tmp_path: Path) -> None:
    """SIGKILL between the study's ask and the ledger's start leaves a RUNNING study trial
    with only some parameters (and no key): --resume adopts it and samples the rest."""
    sweep = tmp_path / "sweep"
    book, searcher = _book(sweep)
    whole = searcher.suggest("a")
    book.started("a", whole["trial"])
    book.end("a", _final(0.4))
    study = book.study
    half = study.ask()  # the killed driver's ask: one parameter of the space written
    name, value = next(iter(study.trials[0].params.items()))
    dist = study.trials[0].distributions[name]
    study._storage.set_trial_param(half._trial_id, name, dist.to_internal_repr(value), dist)
    assert len(study.trials[0].params) > 1, "the space needs two parameters for this test"

    book, searcher = _book(sweep)
    adopted = searcher.suggest("y")  # the half-asked trial, keyed by its new Tune trial
    assert adopted[KEY] == "y"
    frozen = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep / 'optuna.db'}"
                               ).trials[1]
    assert frozen.params[name] == value
    assert set(frozen.params) == set(study.trials[0].params)  # the rest sampled
    assert Ledger(sweep).entry("y").number == frozen.number == 1
    book.started("y", adopted["trial"])
    book.end("y", _final(0.5))
    assert searcher.suggest("z")[KEY] == "z"
    assert _study_states(sweep) == [("a", "COMPLETE", 0.4), ("y", "COMPLETE", 0.5),
                                    ("z", "RUNNING", None)]


def test_an_end_only_the_ledger_saw_reaches_the_study_and_mlflow_once(tmp_path: Path) -> None:
    """The trial wrote its end, the driver died before passing it on: the next driver's
    book brings the study and MLflow in line, and doing it again changes nothing."""
    sweep = tmp_path / "sweep"
    book, searcher = _book(sweep)
    book.started("a", searcher.suggest("a")["trial"])
    Ledger(sweep).end("a", _final(0.6))  # written by the trial itself
    book, _ = _book(sweep)
    book.sync_all()
    assert _study_states(sweep) == [("a", "COMPLETE", 0.6)]
    (run,) = _children(tmp_path)
    assert (run.info.status, run.data.tags["tailtune.status"]) == ("FINISHED", "completed")
    book, _ = _book(sweep)
    book.sync_all()
    (again,) = _children(tmp_path)
    assert again.info.end_time == run.info.end_time
    assert _study_states(sweep) == [("a", "COMPLETE", 0.6)]


# ---------------------------------------------------------------- a trial's worker dies
@pytest.mark.slow
def test_a_killed_worker_is_retried_from_its_checkpoint_in_the_same_run(tmp_path: Path) -> None:
    storage, name, epochs = tmp_path / "runs", "worker-kill", 30
    log = tmp_path / "sweep.log"
    proc = _start(_command(storage, name, "--space", "ce", "--epochs", str(epochs),
                           "--num-samples", "2", "--max-concurrent", "2", "--scheduler", "none",
                           "--checkpoint-interval", "0", "--max-failures", "2"),
                  log, uuid.uuid4().hex)

    first_seen: dict[Path, int] = {}

    def checkpointed_trial() -> str | None:
        """A trial with its second checkpoint (epoch 2) in its ledger entry."""
        for path in Ledger(storage / name).folder.glob("*/checkpoint.pt"):
            mtime = path.stat().st_mtime_ns
            if first_seen.setdefault(path, mtime) != mtime:
                return path.parent.name
        return None

    try:
        key = _wait_for(checkpointed_trial, proc, log)
        client = MlflowClient(local_tracking_uri(storage))
        # the trial's MLflow run names the worker process running it
        run = _wait_for(lambda: next((r for r in _children(storage)
                                      if r.data.tags["tailtune.trial_id"] == key
                                      and "tailtune.pid" in r.data.tags), None), proc, log)
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
        victim = int(run.data.tags["tailtune.pid"])
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    keys = _assert_exact(storage, name, num_samples=2, epochs=epochs)
    assert key in keys
    from ray.tune import ExperimentAnalysis

    trial = next(t for t in ExperimentAnalysis(str(storage / name / "tune")).trials
                 if t.config[KEY] == key)
    assert trial.num_failures == 1
    # the retry started from a checkpoint (epoch 2 or later), in another process
    assert trial.last_result["resumed_from_epoch"] >= 2 and trial.last_result["pid"] != victim
    (child,) = [r for r in _children(storage) if r.data.tags["tailtune.trial_id"] == key]
    assert child.info.run_id == run.info.run_id  # the same run continued, not a second one
    assert child.data.tags["tailtune.retries"] == "1"
    assert child.data.tags["tailtune.pid"] == str(trial.last_result["pid"])
    assert "retrying from its last checkpoint" in log.read_text()


# ---------------------------------------------------------------- the driver dies
# Fused: 3 trials as a group of 2 members and a group of 1 (search.optuna_search)
FUSED = pytest.param(("--fuse", "2"), id="fused")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [pytest.param((), id="unfused"), FUSED])
def test_a_sweep_killed_with_sigkill_resumes_to_exact_counts(tmp_path: Path,
                                                              extra: tuple[str, ...]) -> None:
    run = _interrupt_and_resume(tmp_path, signal.SIGKILL, extra=extra)
    assert run["first_code"] == -signal.SIGKILL
    assert run["leftovers"] == []  # the local Ray the driver started died with it
    _assert_resumed_without_loss(run)
    _assert_continued_from_checkpoints(run, fused=bool(extra))


def _has_experiment_state(tune_dir: Path) -> bool:
    return any(tune_dir.glob("experiment_state-*"))


def _tune_started_without_snapshot(storage: Path, name: str) -> bool:
    tune_dir = storage / name / "tune"
    return (tune_dir / "tuner.pkl").exists() and not _has_experiment_state(tune_dir)


@pytest.mark.slow
def test_a_sweep_killed_before_tunes_first_snapshot_resumes_to_exact_counts(
        tmp_path: Path) -> None:
    """Tune writes tuner.pkl before its first experiment state: restored from that alone it
    would run one trial; --resume must start a new Tuner on the same study and runs."""
    run = _interrupt_and_resume(tmp_path, signal.SIGKILL, samples=3, epochs=4,
                                when=_tune_started_without_snapshot)
    assert run["first_code"] == -signal.SIGKILL
    # Killed inside the window (about 0.23 s here), before any trial ended.
    assert not run["before"]["tune_snapshot"] and run["before"]["records"] == {}
    _assert_resumed_without_loss(run, ended_before=False)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [pytest.param((), id="unfused"), FUSED])
def test_a_sweep_interrupted_with_sigint_says_how_to_resume_and_resumes(
        tmp_path: Path, extra: tuple[str, ...]) -> None:
    run = _interrupt_and_resume(tmp_path, signal.SIGINT, extra=extra)
    assert run["first_code"] == 1, run["first_out"][-4000:]
    last = run["first_out"].strip().splitlines()[-1]
    assert last == (f"Sweep interrupted: continue it with: python search/run.py --resume "
                    f"--name {run['name']} --storage {run['storage']}")
    assert run["leftovers"] == []  # ray.shutdown() ended the local Ray
    # While it waits for --resume, no run is left RUNNING: ended trials are final, the others
    # interrupted (KILLED), to be continued.
    assert set(run["before"]["statuses"]) <= {("FINISHED", "completed"),
                                              ("KILLED", "interrupted")}
    assert ("FINISHED", "completed") in run["before"]["statuses"]
    _assert_resumed_without_loss(run)
    _assert_continued_from_checkpoints(run, fused=bool(extra))


@pytest.mark.slow
def test_a_sweep_sent_sigterm_stops_like_ctrl_c_and_resumes(tmp_path: Path) -> None:
    """SIGTERM (kill, timeout, a scheduler ending the job) to the driver: ray.init installs its
    own handler (a plain exit, records left open), so the CLI's must be set after it."""
    run = _interrupt_and_resume(tmp_path, signal.SIGTERM, group=False)
    assert run["first_code"] == 1, run["first_out"][-4000:]
    assert run["first_out"].strip().splitlines()[-1].startswith("Sweep interrupted: continue")
    assert run["leftovers"] == []
    assert set(run["before"]["statuses"]) <= {("FINISHED", "completed"),
                                              ("KILLED", "interrupted")}
    _assert_resumed_without_loss(run)


@pytest.mark.slow
def test_an_interrupt_while_a_trial_takes_over_a_reused_actor_leaves_the_sweep_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Until its reused actor is reset, a trial shows as last result the actor's metrics, with
    the previous trial's id and config. Ctrl-C while that reset was in flight (1 in 12 random
    interrupts here) made the sweep take the trial for the ended one before it, report itself
    completed and exit 0, the trial never run. The moment is made certain: the third trial's
    reset is held back and the interrupt sent."""
    from ray.tune.execution.tune_controller import TuneController

    resets = []
    reset = TuneController._schedule_trial_reset

    def hold_third_reset_and_interrupt(self, trial, *args, **kwargs):
        resets.append(trial.last_result.get("trial_id"))  # the actor's last trial
        if len(resets) < 2:
            return reset(self, trial, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # the third trial, on the first two's actor

    monkeypatch.setattr(TuneController, "_schedule_trial_reset",
                        hold_third_reset_and_interrupt)
    storage, name = tmp_path / "runs", "reuse"
    args = ["--storage", str(storage), "--name", name, "--no-plots"]
    code = main([*args, "--space", "ce", "--epochs", "2", "--num-samples", "3",
                 "--max-concurrent", "1", "--scheduler", "none"])
    out = capsys.readouterr().out
    assert len(resets) == 2 and resets[1] in _records(storage, name)  # shown as ended
    assert code == 1, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"Sweep interrupted: continue it with: "
                                                   f"python search/run.py --resume --name {name}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert len(_records(storage, name)) == 2

    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    _assert_exact(storage, name, 3, 2)


# ---------------------------------------------------------------- divergence
# A space whose trials either train normally or blow up at once; with TPE seed 0 the three
# trials draw stable, diverging, stable (checked), so the sweep must go on after the divergence.
_DIVERGE_MODULE = "tailtune_test_diverge_space"


def _diverging_space() -> types.ModuleType:
    from spaces.core import Dimension, Space

    def derive(params: dict, config: dict) -> None:
        config["lr"] = 1e6 if params.get("regime") == "diverging" else 0.05

    module = types.ModuleType(_DIVERGE_MODULE)
    module.SPACE = Space(
        name="diverge", method="ce", summary="stable or diverging learning rate",
        dimensions=(Dimension("regime", "stage1", "lr 0.05 or 1e6",
                              choices=("diverging", "stable"), derived=True),),
        plans={"tiny": {"epochs": 4, "schedule": "constant", "warmup_epochs": 0}},
        derive=derive,
    )
    return module


@pytest.mark.slow
def test_a_diverging_trial_is_marked_failed_in_optuna_and_the_sweep_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import spaces

    monkeypatch.setitem(sys.modules, _DIVERGE_MODULE, _diverging_space())
    monkeypatch.setitem(spaces.SPACES, "diverge", sys.modules[_DIVERGE_MODULE].SPACE)
    storage, name = tmp_path / "runs", "diverge"
    code = main(["--space", "diverge", "--num-samples", "3", "--max-concurrent", "1",
                 "--scheduler", "none", "--storage", str(storage), "--name", name,
                 "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    regimes = [(t.params["regime"], t.state.name, t.user_attrs["tailtune_status"])
               for t in sorted(study.trials, key=lambda t: t.number)]
    assert regimes == [("stable", "COMPLETE", "completed"), ("diverging", "FAIL", "diverged"),
                       ("stable", "COMPLETE", "completed")]
    diverged_key = sorted(study.trials, key=lambda t: t.number)[1].user_attrs["tune_trial_id"]

    client = MlflowClient(local_tracking_uri(storage))
    children = {r.data.tags["tailtune.trial_id"]: r for r in _children(storage)}
    assert len(children) == 3
    diverged = children.pop(diverged_key)
    assert diverged.data.tags["tailtune.status"] == "diverged"
    assert diverged.info.status == "FINISHED"
    steps = [s for s, _, _ in _steps(client, diverged.info.run_id)]
    assert steps and steps[-1] < 4  # stopped at the divergence, its CPU given back
    for run in children.values():  # trials after it still ran to their end
        assert run.data.tags["tailtune.status"] == "completed"
        assert [s for s, _, _ in _steps(client, run.info.run_id)] == [1, 2, 3, 4]
    assert re.search(rf"trial {diverged_key} diverged", out)
    record = json.loads((Ledger(storage / name).folder / diverged_key / "end.json").read_text())
    assert record["status"] == "diverged"


# ---------------------------------------------------------------- bad environments
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bad_environments(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    port = _free_port()  # nothing listens there
    return [
        (["--storage", str(a_file / "runs")],
         f"--storage {a_file / 'runs'} cannot be created: {a_file} is not a folder"),
        (["--mlflow-uri", f"http://127.0.0.1:{port}"],
         f"--mlflow-uri http://127.0.0.1:{port}: no MLflow server answers there "
         "(connection refused)"),
        (["--mlflow-uri", str(tmp_path / "mlruns")],
         "is a file store, which MLflow 3.13+ refuses"),
        (["--mlflow-uri", f"sqlite:///{a_file}/mlflow.db"],
         f"--mlflow-uri sqlite:///{a_file}/mlflow.db cannot be created: {a_file} is not a "
         "folder"),
        (["--address", f"127.0.0.1:{port}"],
         f"--address 127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} "
         "(connection refused)"),
        (["--address", "head-without-port"], "--address head-without-port is not a Ray address"),
    ]


def test_environments_the_sweep_cannot_use_are_refused_up_front(tmp_path: Path,
                                                                capsys) -> None:
    for extra, message in _bad_environments(tmp_path):
        storage = tmp_path / "runs"
        args = ["--space", "ce", "--storage", str(storage), *extra]
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (extra, captured.err)
        assert len(lines) == 1 and lines[0].startswith("search/run.py: error: "), captured.err
        assert message in lines[0], (message, lines[0])
        assert captured.out == ""
        assert not storage.exists()  # nothing written: no results folder, no MLflow store


def test_a_local_ray_gets_token_authentication_without_touching_home() -> None:
    from search.cluster import local_auth_settings

    home_token = (Path.home() / ".ray" / "auth_token").exists()
    settings = local_auth_settings({})
    assert settings["RAY_AUTH_MODE"] == "token"
    # a token of its own for this run, unless the user has one in ~/.ray
    assert ("RAY_AUTH_TOKEN" in settings) is not home_token
    if not home_token:
        assert re.fullmatch(r"[0-9a-f]{64}", settings["RAY_AUTH_TOKEN"])
        assert local_auth_settings({})["RAY_AUTH_TOKEN"] != settings["RAY_AUTH_TOKEN"]
    # what the user set is kept as it is
    assert local_auth_settings({"RAY_AUTH_MODE": "disabled"}) == {}
    assert local_auth_settings({"RAY_AUTH_TOKEN_PATH": "/secret"}) == {"RAY_AUTH_MODE": "token"}
