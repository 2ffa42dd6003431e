"""Per-trial plots for a real trial of every method, and per-sweep plots of real Optuna studies,
written to disk and logged to a real MLflow store."""

from __future__ import annotations

import math
import re
from pathlib import Path

import optuna
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from results.mlflow_logging import SweepRecorder, local_tracking_uri
from results.plots import history_from_run, log_trial_plots, make_trial_plots, result_from_run
from results.plots import main as plots_main
from results.sweep_plots import (
    COLOURMAP,
    MIN_IMPORTANCE_TRIALS,
    NOTES_FILE,
    PLOTS,
    log_sweep_plots,
    make_sweep_plots,
)
from trainables.pipeline import run_trial

TINY = {"dataset": "digits_lt", "device": "cpu", "batch_size": 64, "warmup_epochs": 1}
METHODS = {
    "ce": {"method": "ce", "epochs": 2},
    "dro_lt": {"method": "dro_lt", "epochs": 1, "dro_epochs": 1, "cls_epochs": 1,
               "radius": "learned"},
    "wb": {"method": "wb", "epochs": 1, "cls_epochs": 1},
    "dro_wb": {"method": "dro_wb", "epochs": 1, "dro_epochs": 1, "cls_epochs": 1,
               "radius": "count"},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {name: run_trial({**TINY, **config}) for name, config in METHODS.items()}


def _is_png(path: Path) -> bool:
    image = imread(path)
    return path.read_bytes()[:8] == PNG_MAGIC and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("method", list(METHODS))
def test_every_plot_of_a_trial_is_written(results: dict, method: str, tmp_path: Path) -> None:
    result = results[method]
    files = make_trial_plots(result, tmp_path)
    names = [f.name for f in files]
    has_dro = result["diagnostics"]["radii"] is not None
    assert has_dro == method.startswith("dro")
    expected = ["per_class_accuracy.png", "weight_norms.png",
                *(["radii.png"] if has_dro else []), "learning_curves.png"]
    assert names == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    for path in files:
        assert path.stat().st_size > 10_000 and _is_png(path), path


def test_plots_tolerate_missing_groups_and_history(results: dict, tmp_path: Path) -> None:
    """An outcome as the Tune adapter reports it: no history; a group without classes (None)."""
    result = {key: value for key, value in results["ce"].items() if key != "history"}
    result["val"] = {**result["val"], "many": None,
                     "per_class": [None, *result["val"]["per_class"][1:]]}
    names = [path.name for path in make_trial_plots(result, tmp_path)]
    assert names == ["per_class_accuracy.png", "weight_norms.png"]


@pytest.fixture
def recorded(results: dict, tmp_path: Path) -> tuple[str, dict, list[str]]:
    """A DRO-LT trial recorded twice as the sweep callback records it: epochs as metrics, then
    the outcome without history. Returns (tracking uri, outcome, run ids)."""
    result = results["dro_lt"]
    uri = local_tracking_uri(tmp_path)
    recorder = SweepRecorder(uri, "plots", "sweep", {"space": "dro_lt", "dataset": "digits_lt",
                                                     "imbalance": 10.0, "protocol": "holdout"})
    recorder.start({})
    outcome = {key: value for key, value in result.items() if key != "history"}
    run_ids = []
    for trial_id in ("t1", "t2"):
        run_ids.append(recorder.trial_run(trial_id, result["config"]))
        for epoch in result["history"]:
            recorder.log_epoch(trial_id, epoch)
        recorder.finish_trial(trial_id, "completed", result["history"][-1], outcome)
    recorder.finish("completed")
    return uri, outcome, run_ids


def test_log_trial_plots_rebuilds_curves_from_the_run(results: dict, recorded: tuple,
                                                      tmp_path: Path) -> None:
    uri, outcome, (run_id, _) = recorded
    result = results["dro_lt"]
    client = MlflowClient(uri)
    history = history_from_run(client, run_id, result["config"])
    assert [row["epoch"] for row in history] == [row["epoch"] for row in result["history"]]
    assert [row["phase"] for row in history] == [row["phase"] for row in result["history"]]
    for mine, original in zip(history, result["history"], strict=True):
        assert mine["val_all"] == pytest.approx(original["val_all"])
        assert mine["train_loss"] == pytest.approx(original["train_loss"])

    logged = log_trial_plots(client, run_id, outcome)
    assert logged == ["plots/per_class_accuracy.png", "plots/weight_norms.png",
                      "plots/radii.png", "plots/learning_curves.png"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "plots")) == sorted(logged)
    folder = Path(client.download_artifacts(run_id, "plots", str(tmp_path / "down")))
    for name in logged:
        assert _is_png(folder / Path(name).name)


def test_recorded_trials_get_their_plots_afterwards(recorded: tuple, capsys) -> None:
    """results/plots.py rebuilds a trial's result from its artifacts and logs the plots."""
    uri, outcome, run_ids = recorded
    client = MlflowClient(uri)
    rebuilt = result_from_run(client, run_ids[1])
    assert rebuilt["class_counts"] == outcome["class_counts"]
    for split in ("val", "test"):
        assert rebuilt[split]["per_class"] == pytest.approx(outcome[split]["per_class"])
        assert rebuilt[split]["all"] == pytest.approx(outcome[split]["all"])
    assert rebuilt["diagnostics"]["radii"] == pytest.approx(outcome["diagnostics"]["radii"])
    assert rebuilt["config"] == outcome["config"]

    folder = uri.removeprefix("sqlite:///").removesuffix("/mlflow.db")
    assert plots_main(["--storage", folder, "--experiment", "plots"]) == 0
    assert "plots logged for 2 trials" in capsys.readouterr().out
    for run_id in run_ids:
        names = sorted(a.path for a in client.list_artifacts(run_id, "plots"))
        assert names == ["plots/learning_curves.png", "plots/per_class_accuracy.png",
                         "plots/radii.png", "plots/weight_norms.png"]
    assert plots_main(["--storage", folder, "--experiment", "plots"]) == 0  # nothing left to do
    assert "plots logged for 0 trials" in capsys.readouterr().out


def _study(n_trials: int, seed: int = 0) -> optuna.Study:
    """A real study of a quick objective with a log-scale, a linear, a categorical and a
    conditional parameter, each trial reporting a learning curve of 4 steps; its last trial is
    pruned at step 2, as ASHA-stopped trials are in a sweep's study."""
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        lam = trial.suggest_float("lam", 0.05, 0.95)
        radius = trial.suggest_categorical("radius", ["erm", "shared", "learned"])
        if radius != "erm":  # like eps: sampled only for some radii
            trial.suggest_float("eps", 0.01, 5.0, log=True)
        value = 1 - abs(math.log10(lr) + 2) / 2 - (lam - 0.3) ** 2 + 0.05 * (radius != "erm")
        for step in range(1, 5):
            trial.report(value * step / 4, step)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name=f"s{n_trials}",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    pruned = study.ask()
    pruned.suggest_float("lr", 1e-3, 1e-1, log=True)
    pruned.report(0.1, 1)
    pruned.report(0.2, 2)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    return study


def _external_urls(html: str) -> list[str]:
    """What a page loads from elsewhere: src/href attributes of its tags that are not local
    (script bodies are left out: plotly.js itself holds links, e.g. to its map tiles' credits,
    that a chart without a map never follows)."""
    markup = re.sub(r"(<script[^>]*>).*?(</script>)", r"\1\2", html, flags=re.S)
    found = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", markup)
    return [url for url in found if re.match(r"(https?:)?//", url)]


def test_sweep_plots_html_and_png_work_offline(tmp_path: Path) -> None:
    study = _study(12)
    files = make_sweep_plots(study, tmp_path)
    assert [f.name for f in files] == [f"{name}.{ext}" for name in PLOTS
                                       for ext in ("html", "png")] + [NOTES_FILE]
    for path in files:
        if path.suffix == ".png":
            assert _is_png(path)
        elif path.suffix == ".html":
            text = path.read_text()
            # plotly.js is in the page (no CDN): nothing is fetched when it opens
            assert _external_urls(text) == [] and path.stat().st_size > 1_000_000, path
            assert "Plotly.newPlot" in text
    # every trial's curve, the pruned one included, is in the learning-curve overlay
    overlay = (tmp_path / "intermediate_values.html").read_text()
    assert overlay.count('"name":"Trial') == len(study.trials) == 13
    assert "13 trials, stopped early included" in overlay
    notes = (tmp_path / NOTES_FILE).read_text()
    assert "optimization_history: drawn from 12 completed of 13 trials" in notes
    assert "param_importances: drawn from 12 completed of 13 trials" in notes


def test_sweep_plots_cdn_html_when_asked(tmp_path: Path) -> None:
    files = make_sweep_plots(_study(3), tmp_path, plotlyjs="cdn")
    html = next(f for f in files if f.name == "optimization_history.html")
    assert _external_urls(html.read_text()) and html.stat().st_size < 100_000


def test_sweep_plots_skip_what_optuna_cannot_draw(tmp_path: Path) -> None:
    few = make_sweep_plots(_study(MIN_IMPORTANCE_TRIALS - 1), tmp_path / "few")
    assert "param_importances.html" not in [f.name for f in few]
    notes = (tmp_path / "few" / NOTES_FILE).read_text()
    assert (f"param_importances: skipped, {MIN_IMPORTANCE_TRIALS - 1} completed trials; "
            f"importances are drawn from {MIN_IMPORTANCE_TRIALS} on") in notes
    empty = optuna.create_study(direction="maximize")
    assert [f.name for f in make_sweep_plots(empty, tmp_path / "none")] == [NOTES_FILE]
    assert "no completed trial" in (tmp_path / "none" / NOTES_FILE).read_text()


def test_parallel_coordinates_png_is_readable(tmp_path: Path) -> None:
    """The worst completed trial's line is dark on white (viridis), not near-white on grey."""
    study = _study(12)
    make_sweep_plots(study, tmp_path)
    image = imread(tmp_path / "parallel_coordinate.png")[..., :3]
    corner = image[5:15, 5:15].reshape(-1, 3)
    assert (corner > 0.99).all()  # a white background
    worst = min(t.value for t in study.trials if t.value is not None)
    best = max(t.value for t in study.trials if t.value is not None)
    dark = colormaps[COLOURMAP](0.0)[:3]  # the colour of the worst trial
    assert sum(dark) / 3 < 0.4 and best > worst
    close = (abs(image - dark) < 0.08).all(axis=2)
    assert close.sum() > 200  # its line is drawn, in that dark colour
    # the HTML page draws the same lines (Optuna's own fades the worst trial to white)
    html = (tmp_path / "parallel_coordinate.html").read_text()
    drawn = re.findall(r'"line":\{"color":"(#[0-9a-f]{6})"', html)
    assert to_hex(dark) in drawn and "rgb(247,251,255)" not in html
    assert html.count('"name":"completed"') == len(study.trials) - 1
    assert html.count('"name":"stopped early"') == 1 and "#8c8c8c" in drawn


def test_log_sweep_plots_to_the_parent_run(tmp_path: Path) -> None:
    uri = local_tracking_uri(tmp_path)
    recorder = SweepRecorder(uri, "sweep-plots", "s", {"space": "dro_lt"})
    parent = recorder.start({})
    client = MlflowClient(uri)
    logged = log_sweep_plots(client, parent, _study(12, seed=1))
    assert sorted(a.path for a in client.list_artifacts(parent, "plots")) == sorted(logged)
    assert len(logged) == 2 * len(PLOTS) + 1
    for artifact in client.list_artifacts(parent, "plots"):
        assert artifact.file_size > 100
