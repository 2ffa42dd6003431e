"""The reproduction report against a real MLflow store of real trials, and the published data."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from results.leaderboard import load_trials
from results.mlflow_logging import SweepRecorder, local_tracking_uri
from results.published import CIFAR_FACTORS, PUBLISHED
from results.report import (
    NOT_MEASURED,
    OTHER_DATASET,
    main,
    method_key,
    render_report,
    report_tables,
)
from trainables.config import PRESETS, TrialConfig
from trainables.pipeline import run_trial

EXPERIMENT = "report-test"
BASE = {"dataset": "digits_lt", "batch_size": 64, "warmup_epochs": 1, "device": "cpu"}
# sweep name -> (protocol, space, trial configs)
SWEEPS = {
    "ce-holdout": ("holdout", "ce", {"lr-high": {"method": "ce", "epochs": 2, "lr": 0.05},
                                     "lr-low": {"method": "ce", "epochs": 2, "lr": 0.01}}),
    "dro-holdout": ("holdout", "dro_lt", {"learned": {"method": "dro_lt", "epochs": 1,
                                                      "dro_epochs": 1, "cls_epochs": 1,
                                                      "radius": "learned"}}),
    "ce-paper": ("paper", "ce", {"paper": {"method": "ce", "epochs": 1, "lr": 0.05}}),
}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real trials recorded with the sweep schema (results.mlflow_logging.SweepRecorder)."""
    folder = tmp_path_factory.mktemp("report_store")
    uri = local_tracking_uri(folder)
    for sweep, (protocol, space, trials) in SWEEPS.items():
        tags = {"space": space, "dataset": "digits_lt", "seed": 0, "imbalance": 10.0,
                "protocol": protocol, "method": space}
        recorder = SweepRecorder(uri, EXPERIMENT, sweep, tags)
        recorder.start({"space": space})
        for trial_id, config in trials.items():
            full = TrialConfig.from_dict({**BASE, **config, "protocol": protocol}).to_dict()
            recorder.trial_run(trial_id, full)
            outcome = run_trial(full, lambda m, _s, r=recorder, t=trial_id: r.log_epoch(t, m))
            recorder.finish_trial(trial_id, "completed", outcome["history"][-1], outcome)
        recorder.finish("completed")
    return folder


def _runs(store: Path) -> list:
    client = MlflowClient(local_tracking_uri(store))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return list(client.search_runs([experiment.experiment_id], "tags.`tailtune.role` = 'trial'"))


def _section(text: str, dataset: str) -> list[list[str]]:
    """Data rows of the measured table under `### dataset`, as cell lists."""
    lines = text.splitlines()
    start = lines.index(f"### {dataset}")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]  # header and separator


def _pcts(run, split: str = "test") -> str:
    metrics = run.data.metrics
    return " / ".join(f"{metrics[f'{split}_{g}'] * 100:.2f}" if f"{split}_{g}" in metrics else "-"
                      for g in ("all", "many", "medium", "few"))


def test_measured_rows_are_the_best_by_validation(store: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    assert main(["--storage", str(store), "--experiment", EXPERIMENT,
                 "--output", str(target)]) == 0
    rows = _section(target.read_text(), "digits_lt")
    runs = _runs(store)

    def best(sweep: str):
        chosen = [r for r in runs if r.data.tags["tailtune.sweep"] == sweep]
        # best validation accuracy; on a tie, the trial that started first
        return min(chosen, key=lambda r: (-r.data.metrics["val_all"], r.info.start_time))

    for key, sweep, protocol in (("ce", "ce-holdout", "holdout (selected on validation)"),
                                 ("dro_lt/learned", "dro-holdout",
                                  "holdout (selected on validation)"),
                                 ("ce", "ce-paper", "paper (selected on TEST)")):
        run = best(sweep)
        mine = [r for r in rows if f"(`{key}`)" in r[0] and r[3] == protocol]
        assert mine, (key, protocol)
        published = [p for p in PUBLISHED if p.method == key and p.dataset == "cifar100_lt"]
        assert len(mine) == len(published)  # one row per published line of that method
        for row in mine:
            assert row[2] == "10"
            assert row[4] == _pcts(run)  # the test accuracy of the val-selected trial
            assert row[6] == OTHER_DATASET  # digits is not CIFAR-100-LT: no gap
            assert row[7].startswith(f"{sweep}/{run.data.tags['tailtune.trial_id']}, "
                                     f"val all {run.data.metrics['val_all'] * 100:.2f}")
        # the published column is CIFAR-100-LT at the same factor, for reference
        assert sorted(row[5].split(" / ")[0] for row in mine) == sorted(
            f"{p.overall[10]:.2f}" for p in published)
    # the measured table holds measured rows only; the rest is listed after it
    assert all(r[4] != NOT_MEASURED for r in rows)
    text = target.read_text()
    unmeasured = text[text.index("## Not measured"):]
    digits = next(line for line in unmeasured.splitlines() if line.startswith("- digits_lt"))
    # dro_lt/learned was measured (sweep dro-holdout), dro_lt/count was not
    assert "(`dro_lt/count`)" in digits and "(`dro_lt/learned`)" not in digits


def test_report_leads_with_what_was_measured(store: Path) -> None:
    trials = load_trials(local_tracking_uri(store), EXPERIMENT)
    text = render_report(trials, EXPERIMENT, "store")
    measured, unmeasured = text.index("## Measured"), text.index("## Not measured")
    assert measured < text.index("### digits_lt") < unmeasured
    assert NOT_MEASURED not in text[measured:unmeasured]  # nothing unmeasured above the fold
    assert "### cifar100_lt" not in text  # no CIFAR-100 trial: no CIFAR-100 table at all
    # every CIFAR-100-LT published line nothing was measured for: one compact line, all IFs
    listed = [line for line in text[unmeasured:].splitlines()
              if line.startswith("- cifar100_lt: ")]
    lines = [p for p in PUBLISHED if p.dataset == "cifar100_lt"]
    assert len(listed) == len(lines)
    for published in lines:
        line = next(item for item in listed if f", {published.label} (" in item)
        for factor in CIFAR_FACTORS:
            groups = published.groups.get(factor)
            value = " / ".join([f"{published.overall[factor]:.2f}",
                                *(f"{v:.2f}" for v in groups or ())])
            assert f"IF {factor:g}: {value}" in line


def test_gap_is_ours_minus_published_on_the_same_benchmark(store: Path) -> None:
    """The table logic on a measured CIFAR-100-LT row: the store's digits trials relabelled
    (only the dataset and factor columns change; the numbers are the store's)."""
    trials = load_trials(local_tracking_uri(store), EXPERIMENT)
    holdout = trials[(trials["protocol"] == "holdout") & (trials["space"] == "ce")]
    relabelled = holdout.assign(dataset="cifar100_lt", imbalance=100.0)
    table = report_tables(relabelled)["cifar100_lt"]
    best = holdout.sort_values(["val_all", "start_time"], ascending=[False, True]).iloc[0]
    for line in (p for p in PUBLISHED if p.method == "ce" and p.dataset == "cifar100_lt"):
        row = table[table["published line"].str.startswith(line.label + " (")
                    & (table["IF"] == "100")].iloc[0]
        ours = [best[f"test_{g}"] * 100 for g in ("all", "many", "medium", "few")]
        theirs = [line.overall[100], *line.groups[100]]
        expected = " / ".join(f"{a - b:+.2f}" for a, b in zip(ours, theirs, strict=True))
        assert row["gap (points)"] == expected
    assert (table[table["IF"] == "50"]["ours: all / many / med / few"] == NOT_MEASURED).all()


@pytest.mark.parametrize("config, key", [
    ({"method": "ce"}, "ce"),
    ({"method": "ce", "classifier": "tau_norm"}, "ce+tau_norm"),
    ({"method": "wb"}, "wb/cb+maxnorm"),
    ({"method": "wb", "maxnorm": "off"}, "wb/cb"),
    (PRESETS["wb_paper"], "wb/cb+maxnorm"),
    (PRESETS["dro_lt_paper"], "dro_lt/learned"),
    ({"method": "dro_lt", "radius": "erm"}, "dro_lt/erm"),
    ({"method": "dro_wb", "radius": "count"}, "dro_wb/count"),
    ({"method": "ce", "classifier": "retrain", "cls_epochs": 3}, "ce+crt"),
])
def test_method_key_from_the_trial_config(config: dict, key: str) -> None:
    assert method_key(TrialConfig.from_dict(config).to_dict()) == key


def test_unknown_experiment_exits_2(store: Path, capsys) -> None:
    assert main(["--storage", str(store), "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and err.count("\n") == 1
