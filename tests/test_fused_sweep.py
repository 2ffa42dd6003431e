"""A fused sweep end to end (real Ray, Optuna, MLflow, training): each member of a fused Tune
trial is its own ledger entry, Optuna trial and MLflow child run, judged at ASHA's rungs alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from results.mlflow_logging import local_tracking_uri
from search.ledger import Ledger, Status

REPO = Path(__file__).resolve().parent.parent
OPTUNA_STATE = {Status.COMPLETED: "COMPLETE", Status.STOPPED_EARLY: "PRUNED"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "search/run.py", "--no-plots", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_each_member_of_a_fused_sweep_is_a_trial_of_its_own(tmp_path: Path) -> None:
    storage, name = tmp_path / "runs", "fused"
    done = _run("--space", "dro_lt", "--fuse", "4", "--num-samples", "4", "--epochs", "14",
                "--storage", str(storage), "--name", name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the one group of four takes every core a trial slot has (search.cluster)
    assert re.search(r"4 trials fused in each \((\d+) CPU a fused one\)", done.stdout)
    entries = Ledger(storage / name).entries()
    keys = sorted(e.key for e in entries)
    group = keys[0].rsplit("-", 1)[0]
    assert keys == [f"{group}-{i}" for i in range(4)]  # one Tune trial, four members
    statuses = {e.key: e.status for e in entries}
    # dro_lt trials share one stage 1: trained once into the sweep's stage-1 cache, then
    # reported `replayed` by every member, as unfused trials that hit the cache report it
    assert len(list((storage / "stage1_cache").glob("*.pt"))) == 1
    for entry in entries:
        assert [row["replayed"] for row in entry.history[:8]] == [True] * 8, entry.key
        assert not any(row["replayed"] for row in entry.history[8:]), entry.key
    assert set(statuses.values()) <= {Status.COMPLETED, Status.STOPPED_EARLY}
    # per-member ASHA: rungs at epochs 9, 10, 12 (grace 1 after the 8 stage-1 epochs)
    stopped = [e for e in entries if e.status is Status.STOPPED_EARLY]
    assert stopped, "no member was stopped at a rung"
    for entry in entries:
        verdicts = Ledger(storage / name).rungs(entry.key)
        last = entry.result["epoch"]
        assert all(int(epoch) <= last for epoch in verdicts)
        stopped_at = [int(e) for e, v in verdicts.items() if v["stop"]]
        if entry.status is Status.STOPPED_EARLY:
            assert stopped_at == [last] and last < 14  # ended at the rung that stopped it
        else:
            assert stopped_at == [] and last == 14 and entry.result["final"]

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    by_key = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_key) == keys
    for key, status in statuses.items():
        trial = by_key[key]
        assert trial.state.name == OPTUNA_STATE[status]
        assert max(trial.intermediate_values) == Ledger(storage / name).entry(key).result["epoch"]

    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("tailtune")
    children = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'")
    assert sorted(r.data.tags["tailtune.trial_id"] for r in children) == keys
    for run in children:
        key = run.data.tags["tailtune.trial_id"]
        assert (run.info.status, run.data.tags["tailtune.status"]) == (
            "FINISHED", statuses[key].value)
        history = client.get_metric_history(run.info.run_id, "val_all")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        # how many members trained each epoch together: four, fewer once members left
        together = [m.value for m in sorted(
            client.get_metric_history(run.info.run_id, "fused_members"), key=lambda m: m.step)]
        assert together[0] == 4 and together == sorted(together, reverse=True)
        if statuses[key] is Status.COMPLETED and len(stopped) > 0:
            assert together[-1] <= 4 - len(stopped)


def test_a_space_whose_trials_cannot_be_fused_is_refused_up_front(tmp_path: Path) -> None:
    done = _run("--space", "la", "--fuse", "2", "--storage", str(tmp_path / "runs"))
    assert done.returncode == 2 and not (tmp_path / "runs").exists()
    assert done.stderr.strip().splitlines() == [
        "search/run.py: error: --fuse 2: the trials of space la cannot be fused (method la has "
        "its own stage-1 loss or post-hoc step, which the fused path does not run; accepted: "
        "ce, dro_lt, wb, dro_wb); accepted: --fuse 1"]
    bad = _run("--space", "ce", "--fuse", "0", "--storage", str(tmp_path / "runs"))
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "search/run.py: error: --fuse must be an integer in [1, 64]; got 0")
