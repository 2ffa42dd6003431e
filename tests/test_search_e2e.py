"""The search platform end to end: a real sweep (local Ray, Optuna, ASHA, MLflow on SQLite), the
Tune adapter around the real pipeline, and the MLflow records across a driver restart."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from results.mlflow_logging import SweepRecorder, local_tracking_uri
from search.ledger import end_status as trial_status
from trainables.config import TrialConfig
from trainables.pipeline import run_trial
from trainables.tune import CHECKPOINT_FILE, EpochReporter, TrialRuntime

REPO = Path(__file__).resolve().parents[1]
TINY = {"dataset": "digits_lt", "batch_size": 64, "dro_batch_size": 64, "cls_batch_size": 64,
        "warmup_epochs": 1}


# ---------------------------------------------------------------- the Tune adapter, without Ray
class Collector:
    """Stands in for tune.report / tune.Checkpoint: keeps what the adapter reports."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reports: list[dict] = []
        self.checkpoints: dict[int, Path] = {}  # epoch -> saved state

    def report(self, metrics: dict, checkpoint: Path | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint is not None:
            self.checkpoints[metrics["epoch"]] = checkpoint

    def make_checkpoint(self, folder: Path) -> Path:
        kept = self.folder / f"ckpt_{len(self.checkpoints)}"
        shutil.copytree(folder, kept)  # the adapter's folder is temporary
        return kept / CHECKPOINT_FILE


def _reporter(config: TrialConfig, collector: Collector, offset: int) -> EpochReporter:
    runtime = TrialRuntime(rung_offset=offset, checkpoint_interval_s=0)
    return EpochReporter(config.total_epochs, runtime, "node-a", collector.report,
                         collector.make_checkpoint)


def test_adapter_reports_each_epoch_checkpoints_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = TrialConfig.from_dict({**TINY, "method": "dro_lt", "epochs": 2, "dro_epochs": 1,
                                    "cls_epochs": 1, "radius": "count", "eps": 0.5})
    full = Collector(tmp_path / "full")
    full.folder.mkdir()
    reporter = _reporter(config, full, offset=2)
    outcome = run_trial(config, reporter.on_epoch)
    reporter.finish(outcome)

    assert [r["epoch"] for r in full.reports] == [1, 2, 3, 4]
    assert [r["method_epoch"] for r in full.reports] == [0, 0, 1, 2]
    assert [r["phase"] for r in full.reports] == ["stage1", "stage1", "dro", "classifier"]
    assert all(r["node_id"] == "node-a" and r["total_epochs"] == 4 for r in full.reports)
    *epochs, last = full.reports
    assert not any(r["final"] for r in epochs) and last["final"] and not last["diverged"]
    assert last["val_all"] == outcome["val"]["all"] and last["test_all"] == outcome["test"]["all"]
    assert len(last["outcome"]["val"]["per_class"]) == 10
    assert trial_status(last) == "completed" and trial_status(epochs[-1]) == "stopped_early"
    assert sorted(full.checkpoints) == [1, 2, 3]  # every live epoch but the final one

    # Resume from the checkpoint of epoch 2 (the end of stage 1): only epochs 3 and 4 again.
    resumed = Collector(tmp_path / "resumed")
    resumed.folder.mkdir()
    reporter = _reporter(config, resumed, offset=2)
    state = torch.load(full.checkpoints[2], weights_only=True)
    outcome = run_trial(config, reporter.on_epoch, resume_state=state)
    reporter.finish(outcome)
    assert [r["epoch"] for r in resumed.reports] == [3, 4]
    assert resumed.reports[-1]["final"]


def test_adapter_does_not_checkpoint_epochs_replayed_from_the_stage1_cache(tmp_path) -> None:
    config = TrialConfig.from_dict({**TINY, "method": "wb", "epochs": 2, "cls_epochs": 1})
    for run in ("first", "second"):
        collector = Collector(tmp_path / run)
        collector.folder.mkdir()
        reporter = _reporter(config, collector, offset=2)
        reporter.finish(run_trial(config, reporter.on_epoch, cache_dir=str(tmp_path / "cache")))
    assert [r["replayed"] for r in collector.reports] == [True, True, False]
    assert sorted(collector.checkpoints) == []  # replayed epochs 1-2; epoch 3 is the final one


def test_adapter_reports_a_diverged_trial_once_with_its_outcome(tmp_path: Path) -> None:
    config = TrialConfig.from_dict({**TINY, "method": "ce", "epochs": 3, "lr": 1e6,
                                    "schedule": "constant", "warmup_epochs": 0})
    collector = Collector(tmp_path)
    reporter = _reporter(config, collector, offset=0)
    outcome = run_trial(config, reporter.on_epoch)
    reporter.finish(outcome)
    assert outcome["status"] == "diverged"
    last = collector.reports[-1]
    assert last["diverged"] and not last["final"] and "test_all" in last
    assert last["epoch"] < 3 or outcome["epochs_run"] == 3
    assert trial_status(last) == "diverged"
    assert sum(r["diverged"] for r in collector.reports) == 1  # reported once, at its end


def test_trial_status_reads_the_last_result() -> None:
    assert trial_status({"epoch": 3, "final": True}) == "completed"
    assert trial_status({"epoch": 2, "final": False}) == "stopped_early"
    assert trial_status({"epoch": 2, "diverged": True}) == "diverged"
    assert trial_status({"epoch": 2}, error=True) == "failed"
    assert trial_status(None) == "failed"


# ---------------------------------------------------------------- MLflow records
def test_mlflow_records_survive_a_driver_restart_without_duplicates(tmp_path: Path) -> None:
    uri = local_tracking_uri(tmp_path)
    tags = {"space": "dro_lt", "dataset": "digits_lt", "imbalance": 10.0, "seed": 0,
            "protocol": "holdout"}
    config = TrialConfig.from_dict({**TINY, "method": "dro_lt"}).to_dict()
    first = SweepRecorder(uri, "exp", "sweep-a", tags)
    parent = first.start({"num_samples": 2})
    run_id = first.trial_run("t1", config)
    for epoch in (1, 2):
        first.log_epoch("t1", {"epoch": epoch, "val_all": 0.1 * epoch, "phase": "stage1"})

    # The driver dies; a new one (resume) finds the same parent and child and goes on.
    second = SweepRecorder(uri, "exp", "sweep-a", tags)
    assert second.start({"num_samples": 2}) == parent
    assert second.trial_run("t1", config) == run_id
    for epoch in (1, 2, 3):  # the trial replays from its last checkpoint
        second.log_epoch("t1", {"epoch": epoch, "val_all": 0.1 * epoch})
    outcome = {
        "val": {"all": 0.5, "many": 0.9, "medium": 0.5, "few": None,
                "per_class": [0.9, 0.5, None]},
        "test": {"all": 0.4, "many": 0.8, "medium": 0.4, "few": None,
                 "per_class": [0.8, 0.4, 0.0]},
        "class_counts": [150, 50, 5], "diagnostics": {"radii": [0.1, 0.2, 0.3]},
        "config": config,
    }
    second.finish_trial("t1", "completed", {"epoch": 3, "val_all": 0.5}, outcome)
    second.trial_run("t2", config)
    second.log_epoch("t2", {"epoch": 1, "val_all": 0.2})
    second.finish("interrupted")

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"sweep-a", "t1", "t2"}
    t1, t2, sweep = runs["t1"], runs["t2"], runs["sweep-a"]
    assert [m.step for m in client.get_metric_history(t1.info.run_id, "val_all")] == [1, 2, 3]
    assert t1.info.status == "FINISHED" and t1.data.tags["tailtune.status"] == "completed"
    assert t1.data.metrics["test_all"] == 0.4 and "test_few" not in t1.data.metrics
    assert t1.data.params["method"] == "dro_lt" and len(t1.data.params) == len(config)
    assert t1.data.tags["mlflow.parentRunId"] == parent == sweep.info.run_id
    assert t2.info.status == "KILLED" and t2.data.tags["tailtune.status"] == "interrupted"
    assert sweep.info.status == "KILLED" and sweep.data.tags["tailtune.status"] == "interrupted"
    artifacts = Path(client.download_artifacts(t1.info.run_id, "per_class.csv", str(tmp_path)))
    rows = list(csv.DictReader(artifacts.open()))
    assert [(r["group"], r["val_acc"]) for r in rows] == [("many", "0.9"), ("medium", "0.5"),
                                                          ("few", "")]
    # the artifacts sit next to the store, not in ./mlruns of the working directory
    assert (tmp_path / "mlartifacts").is_dir() and not (Path.cwd() / "mlruns").exists()


def test_a_run_created_just_before_the_driver_died_is_completed_on_resume(
        tmp_path: Path) -> None:
    """SIGKILL between creating a run and logging its params: the resumed driver finds the bare
    run, gives it its params, and never leaves a run without its status tag."""
    uri = local_tracking_uri(tmp_path)
    config = TrialConfig.from_dict({**TINY, "method": "ce"}).to_dict()
    first = SweepRecorder(uri, "exp", "sweep-k", {"space": "ce"})
    first.start({"num_samples": 1})
    run_id = first.trial_run("t1", config)
    client = MlflowClient(uri)
    made = client.get_run(run_id)
    assert made.data.tags["tailtune.status"] == "running"  # set in the same call that made it
    # What a kill between create_run and log_batch leaves: a run with its identity tags only.
    identity = {k: v for k, v in made.data.tags.items()
                if k in ("tailtune.role", "tailtune.sweep", "mlflow.parentRunId")}
    bare = client.create_run(made.info.experiment_id, run_name="t2",
                             tags={**identity, "tailtune.trial_id": "t2"})
    second = SweepRecorder(uri, "exp", "sweep-k", {"space": "ce"})
    second.start({"num_samples": 1})
    assert second.trial_run("t2", config) == bare.info.run_id
    resumed = client.get_run(bare.info.run_id)
    assert resumed.data.params["method"] == "ce" and len(resumed.data.params) == len(config)
    assert resumed.data.tags["tailtune.status"] == "running"


# ---------------------------------------------------------------- failed and diverged trials
LR_SPLIT = 0.03  # the trainable below fails below this learning rate and diverges above


def _fail_or_diverge(config: dict) -> None:
    """Stands in for the pipeline where it cannot be made to fail on purpose: an error after
    one epoch (e.g. out of memory), or a divergence reported the way trainables.tune does."""
    from ray import tune

    epoch = {"epoch": 1, "val_all": 0.1, "method_epoch": 1, "total_epochs": 2,
             "node_id": "node-x", "final": False, "diverged": False}
    if config["trial"]["lr"] < LR_SPLIT:
        tune.report(epoch)
        raise RuntimeError("simulated out of memory")
    report = {"val": {"all": 0.1, "many": 0.2, "medium": 0.1, "few": 0.0, "per_class": [0.1]},
              "test": {"all": 0.1, "many": 0.2, "medium": 0.1, "few": 0.0, "per_class": [0.1]}}
    tune.report({**epoch, "diverged": True, "test_all": 0.1,
                 "outcome": {**report, "class_counts": [10], "diagnostics": {},
                             "config": config["trial"]}})


@pytest.mark.slow
def test_failed_and_diverged_trials_get_honest_records(tmp_path: Path) -> None:
    import ray
    from ray import cloudpickle, tune

    from results.mlflow_logging import SweepRecorder
    from search.book import SweepBook
    from search.callbacks import LedgerCallback, StopAll
    from search.ledger import Ledger
    from search.optuna_search import LedgerSearch, tpe_sampler
    from spaces import Sampler, fixed_settings, get_space

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/ on path
    uri = local_tracking_uri(tmp_path)
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="faults", storage=optuna_url, direction="maximize",
                                sampler=tpe_sampler(0, 4))
    recorder = SweepRecorder(uri, "faults", "faults", {"space": "ce"})
    recorder.start({"num_samples": 4})
    book = SweepBook(Ledger(tmp_path / "sweep"), study, recorder,
                     Sampler("ce", fixed_settings(get_space("ce"), "digits_lt")))
    searcher = LedgerSearch(book, num_samples=4, metric="val_all", mode="max")
    callback = LedgerCallback(book, 4, StopAll())
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(
            tune.with_resources(_fail_or_diverge, {"cpu": 1}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=4, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="tune", verbose=0,
                                      callbacks=[callback]),
        ).fit()
    finally:
        ray.shutdown()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("faults")
    children = client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'")
    study = optuna.load_study(study_name="faults", storage=optuna_url)
    assert len(children) == 4 and len(study.trials) == 4
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    seen = set()
    for child in children:
        tags = child.data.tags
        trial = by_id[tags["tailtune.trial_id"]]
        expected = "failed" if trial.params["lr"] < LR_SPLIT else "diverged"
        seen.add(expected)
        assert tags["tailtune.status"] == expected == trial.user_attrs["tailtune_status"]
        assert tags["tailtune.node_id"] == "node-x"
        if expected == "failed":
            assert child.info.status == "FAILED" and trial.state.name == "FAIL"
            assert "simulated out of memory" in tags["tailtune.error"]
        else:
            # diverged: the MLflow run finished honestly, Optuna is told the trial failed
            assert child.info.status == "FINISHED" and trial.state.name == "FAIL"
            assert child.data.metrics["test_all"] == 0.1
    assert seen == {"failed", "diverged"}  # with TPE seed 0 both branches are drawn


# ---------------------------------------------------------------- a whole sweep
def _sweep(args: list[str], storage: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run(
        [sys.executable, "search/run.py", *args, "--storage", str(storage)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_a_real_sweep_is_recorded_in_mlflow_optuna_and_the_leaderboard(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    args = ["--space", "dro_lt", "--epochs", "6", "--num-samples", "4", "--name", "e2e",
            "--reduction-factor", "2", "--grace-period", "1"]
    proc = _sweep(args, storage)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout

    # MLflow: one parent run, one finished child per trial, metrics per epoch and a status
    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("tailtune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tailtune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("tailtune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.data.tags["tailtune.status"] == "completed"
    assert parent.info.status == "FINISHED"
    statuses = {}
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["tailtune.space"] == "dro_lt" and tags["tailtune.dataset"] == "digits_lt"
        assert tags["tailtune.imbalance"] == "10.0" and tags["tailtune.seed"] == "0"
        assert tags["tailtune.node_id"] and tags["tailtune.protocol"] == "holdout"
        assert child.info.status == "FINISHED"
        status = statuses[tags["tailtune.trial_id"]] = tags["tailtune.status"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_all")]
        last = steps[-1]
        assert steps == list(range(1, last + 1))
        if status == "completed":
            assert last == 6 and "test_all" in child.data.metrics
            names = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"config.json", "per_class.csv"} <= names
        else:
            assert status == "stopped_early"
            # ASHA never judged a trial before its DRO phase (stage 1 = epochs 1-4 here)
            assert 4 < last < 6
        assert child.data.params["lam"] and child.data.params["method"] == "dro_lt"
    assert "completed" in statuses.values()

    # Optuna: the same trials, with states that say how each ended
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{storage / 'e2e/optuna.db'}")
    assert len(study.trials) == 4
    expected_state = {"completed": "COMPLETE", "stopped_early": "PRUNED"}
    for trial in study.trials:
        trial_id = trial.user_attrs["tune_trial_id"]
        assert trial.user_attrs["tailtune_status"] == statuses[trial_id]
        assert trial.state.name == expected_state[statuses[trial_id]]
        assert 0 <= trial.params["lam"] <= 1

    # The printed leaderboard lists every trial, and the best trial's test accuracy
    board = out[out.index("Leaderboard"):]
    for trial_id, status in statuses.items():
        assert any(trial_id in line and status in line for line in board.splitlines())
    assert "Best trial" in out and "test accuracy" in out
    assert str(storage / "e2e" / "tune") in out and str(storage / "mlflow.db") in out

    # --resume of the finished sweep re-runs nothing and duplicates nothing
    proc = _sweep(["--resume", "--name", "e2e"], storage)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started" not in proc.stdout
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 5
    assert len(optuna.load_study(study_name="e2e",
                                 storage=f"sqlite:///{storage / 'e2e/optuna.db'}").trials) == 4
