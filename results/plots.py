"""Per-trial diagnostic plots, saved as PNG and logged as MLflow artifacts under `plots/`.

From one trial's result (what `trainables.pipeline.run_trial` returns, or the `outcome` the Tune
adapter reports, which has no epoch history: `log_trial_plots` then reads it back from the run's
metrics):

- per_class_accuracy.png  validation and test accuracy of every class against its training count,
                          with the Few / Medium / Many bands (docs/methods.md 1);
- weight_norms.png        per-class classifier weight norms after stage 1 and at the end, classes
                          ordered by training count, with the MaxNorm radius (Weight Balancing's
                          figure: a naive classifier's norms follow the class frequency);
- radii.png               per-class DRO-LT radius against training count (DRO-LT's Figure 2),
                          only for trials with a DRO phase;
- learning_curves.png     validation accuracy (all / Many / Medium / Few, and the nearest-class-mean
                          accuracy of the DRO phase) and training loss and learning rate per epoch,
                          phases marked.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no display.

Plots for trials already recorded (a sweep run before plots were logged), rebuilt from each run's
artifacts (config.json, per_class.csv, diagnostics.json) and metric history:

    python results/plots.py --experiment NAME [--sweep SWEEP] [--storage DIR | --mlflow-uri URI]
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import the package, not the sibling modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from trainables.evaluation import FEW_THRESHOLD, MANY_THRESHOLD  # noqa: E402

ARTIFACT_DIR = "plots"
PLOT_FILES = ("per_class_accuracy.png", "weight_norms.png", "radii.png", "learning_curves.png")
GROUP_COLOURS = {"few": "#fde0dd", "medium": "#fff7bc", "many": "#e0f3db"}
CURVE_COLOURS = {"all": "black", "many": "tab:green", "medium": "tab:orange", "few": "tab:red"}
HISTORY_METRICS = ("val_all", "val_many", "val_medium", "val_few", "train_loss", "lr",
                   "ncm_all", "ncm_many", "ncm_medium", "ncm_few")
DPI = 110


def make_trial_plots(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the trial's plots into `out_dir`; returns the files written, in PLOT_FILES order.

    A plot is drawn only of what the trial has: per_class_accuracy.png when it was evaluated
    per class (a trial stopped early or failed was not), weight_norms.png when it has classifier
    norms, radii.png when it has a DRO phase whose radius is not `erm` (erm has no radius: its
    "radii" are zeros), learning_curves.png when `result` has a non-empty "history".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in result.get("class_counts") or []]
    diagnostics = result.get("diagnostics") or {}
    config = result.get("config") or {}
    title = _title(result)
    written = []
    if any(v is not None for split in ("val", "test")
           for v in (result.get(split) or {}).get("per_class") or []):
        written.append(_save(_per_class_accuracy(result, counts, title), out / PLOT_FILES[0]))
    norms = diagnostics.get("weight_norms") or {}
    if norms.get("stage1") or norms.get("final"):
        written.append(_save(_weight_norms(diagnostics, counts, title), out / PLOT_FILES[1]))
    radii = diagnostics.get("radii")
    if radii and config.get("radius") != "erm":
        written.append(_save(_radii(radii, counts, config, title), out / PLOT_FILES[2]))
    history = result.get("history") or []
    if history:
        written.append(_save(_learning_curves(history, title), out / PLOT_FILES[3]))
    return written


def log_trial_plots(client: Any, run_id: str, result: Mapping[str, Any]) -> list[str]:
    """Make the trial's plots and log them to the run under `plots/`; returns artifact paths.

    Without a "history" in `result` (the Tune adapter's outcome), the learning curves are built
    from the per-epoch metrics already logged to the run.
    """
    if not result.get("history"):
        result = {**result, "history": history_from_run(client, run_id, result.get("config"))}
    with tempfile.TemporaryDirectory(prefix="tailtune-plots-") as folder:
        files = make_trial_plots(result, folder)
        if files:
            client.log_artifacts(run_id, folder, artifact_path=ARTIFACT_DIR)
    return [f"{ARTIFACT_DIR}/{path.name}" for path in files]


def history_from_run(client: Any, run_id: str,
                     config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per-epoch metric dicts rebuilt from a run's metric history (step = epoch)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for key in HISTORY_METRICS:
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            if metric.step >= 1:
                by_epoch.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    phases = _phase_of_epoch(config or {})
    history = []
    for epoch in sorted(by_epoch):
        row = by_epoch[epoch]
        if epoch in phases:
            row["phase"] = phases[epoch]
        history.append(row)
    return history


def result_from_run(client: Any, run_id: str) -> dict[str, Any]:
    """A trial's result rebuilt from its MLflow records (what log_trial_plots needs).

    Raises FileNotFoundError when the run has no per_class.csv (a trial that did not finish).
    """
    names = {a.path for a in client.list_artifacts(run_id)}
    if "per_class.csv" not in names:
        raise FileNotFoundError(f"run {run_id} has no per_class.csv")
    with tempfile.TemporaryDirectory(prefix="tailtune-run-") as folder:
        def read(name: str) -> str:
            if name not in names:
                return ""
            return Path(client.download_artifacts(run_id, name, folder)).read_text()

        config = json.loads(read("config.json") or "{}")
        diagnostics = json.loads(read("diagnostics.json") or "{}")
        rows = list(csv.DictReader(read("per_class.csv").splitlines()))
    run = client.get_run(run_id)
    metrics = run.data.metrics
    splits = {split: {**{g: metrics.get(f"{split}_{g}") for g in ("all", "many", "medium", "few")},
                      "per_class": [float(r[f"{split}_acc"]) if r[f"{split}_acc"] else None
                                    for r in rows]}
              for split in ("val", "test")}
    imbalance = run.data.tags.get("tailtune.imbalance")
    return {
        **splits,
        "class_counts": [int(r["train_count"]) for r in rows],
        "diagnostics": diagnostics,
        "config": config,
        "protocol": run.data.tags.get("tailtune.protocol", config.get("protocol")),
        "dataset": {"imbalance": float(imbalance)} if imbalance not in (None, "None") else {},
    }


# ------------------------------------------------------------------------------------- figures
def _per_class_accuracy(result: Mapping[str, Any], counts: Sequence[int], title: str) -> Figure:
    fig = Figure(figsize=(9.5, 4.5), dpi=DPI)
    ax = fig.add_subplot()
    _group_bands(ax, counts)
    paper = result.get("protocol") == "paper"
    splits = (("val", "validation" + (" (= test, paper protocol)" if paper else ""), "o", "none"),
              ("test", "test", "s", None))
    for split, label, marker, face in splits:
        values = _floats((result.get(split) or {}).get("per_class") or [])
        points = [(c, v * 100) for c, v in zip(counts, values, strict=False) if not math.isnan(v)]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        kwargs = {"facecolors": face} if face else {}
        ax.scatter(xs, ys, marker=marker, label=label, edgecolors="tab:blue" if face else None,
                   color=None if face else "tab:blue", s=36, zorder=3, **kwargs)
        overall = (result.get(split) or {}).get("all")
        if isinstance(overall, int | float):
            ax.axhline(overall * 100, color="tab:blue", linestyle=":" if face else "--",
                       linewidth=1, label=f"{label}: mean over classes {overall * 100:.1f}%")
    for cls, count in enumerate(counts):
        ax.annotate(str(cls), (count, 0), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_ylim(-5, 112)
    ax.set_xlabel("training images of the class (log scale; class index at the bottom)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Per-class accuracy vs training count\n{title}", fontsize=9)
    _legend_outside(ax)
    return fig


def _weight_norms(diagnostics: Mapping[str, Any], counts: Sequence[int], title: str) -> Figure:
    norms = diagnostics.get("weight_norms") or {}
    stage1, final = _floats(norms.get("stage1") or []), _floats(norms.get("final") or [])
    order = sorted(range(len(counts)), key=lambda c: -counts[c]) if counts else \
        list(range(max(len(stage1), len(final))))
    fig = Figure(figsize=(9.5, 4.5), dpi=DPI)
    ax = fig.add_subplot()
    same = stage1 == final
    series = [("after stage 1" + (" (= final: no classifier phase)" if same else ""), stage1)]
    if not same:
        series.append(("final classifier", final))
    width = 0.8 / max(1, len([s for s in series if s[1]]))
    position = 0
    for label, values in series:
        if not values:
            continue
        xs = [i + (position - (len(series) - 1) / 2) * width for i in range(len(order))]
        ax.bar(xs, [values[c] if c < len(values) else math.nan for c in order], width,
               label=label)
        position += 1
    radius = diagnostics.get("maxnorm_radius")
    if isinstance(radius, int | float):
        ax.axhline(radius, color="tab:red", linestyle="--", linewidth=1,
                   label=f"MaxNorm radius {radius:.3g}")
    ax.set_xticks(range(len(order)))
    labels = [f"{c}\n({counts[c]})" if counts else str(c) for c in order]
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlabel("class (training images), most frequent first")
    ax.set_ylabel("L2 norm of the classifier row")
    ax.set_title(f"Per-class classifier weight norms\n{title}", fontsize=9)
    _legend_outside(ax)
    return fig


def _radii(radii: Sequence[Any], counts: Sequence[int], config: Mapping[str, Any],
           title: str) -> Figure:
    values = _floats(radii)
    fig = Figure(figsize=(9.5, 4.5), dpi=DPI)
    ax = fig.add_subplot()
    _group_bands(ax, counts)
    xs = list(counts[: len(values)]) or list(range(1, len(values) + 1))
    variant = config.get("radius", "?")
    ax.scatter(xs, values, color="tab:purple", zorder=3, label=f"radius eps_c ({variant})")
    for cls, (x, y) in enumerate(zip(xs, values, strict=True)):
        ax.annotate(str(cls), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    eps = config.get("eps")
    if variant == "learned" and isinstance(eps, int | float):
        ax.axhline(eps, color="grey", linestyle="--", linewidth=1,
                   label=f"initial value {eps:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("radius eps_c")
    ax.set_title(f"DRO-LT radius per class vs training count\n{title}", fontsize=9)
    _legend_outside(ax)
    return fig


def _learning_curves(history: Sequence[Mapping[str, Any]], title: str) -> Figure:
    epochs = [int(row["epoch"]) for row in history]
    fig = Figure(figsize=(10, 6.5), dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for group, colour in CURVE_COLOURS.items():
        values = [_float(row.get(f"val_{group}")) * 100 for row in history]
        if not all(math.isnan(v) for v in values):
            top.plot(epochs, values, color=colour, marker=".", label=f"val {group}",
                     linewidth=2 if group == "all" else 1)
        ncm = [_float(row.get(f"ncm_{group}")) * 100 for row in history]
        if group == "all" and not all(math.isnan(v) for v in ncm):
            top.plot(epochs, ncm, color="tab:purple", linestyle="--", marker="x",
                     label="val all, nearest class mean (DRO phase)")
    top.set_ylabel("validation accuracy (%)")
    top.set_ylim(-5, 112)
    _legend_outside(top)
    top.set_title(f"Learning curves\n{title}", fontsize=9)
    loss = [_float(row.get("train_loss")) for row in history]
    bottom.plot(epochs, loss, color="tab:blue", marker=".", label="training loss")
    if all(v > 0 for v in loss if not math.isnan(v)) and any(not math.isnan(v) for v in loss):
        bottom.set_yscale("log")
    bottom.set_ylabel("training loss", color="tab:blue")
    bottom.set_xlabel("epoch (all phases)")
    rate = bottom.twinx()
    rate.plot(epochs, [_float(row.get("lr")) for row in history], color="tab:gray",
              linestyle=":", label="learning rate")
    rate.set_ylabel("learning rate", color="tab:gray")
    if all(v > 0 for v in (_float(row.get("lr")) for row in history) if not math.isnan(v)):
        rate.set_yscale("log")  # phases differ by orders of magnitude in learning rate
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (top, bottom):
        _phase_marks(axis, history)
    return fig


# ------------------------------------------------------------------------------------- helpers
def _group_bands(ax: Any, counts: Sequence[int]) -> None:
    """Shade the Few / Medium / Many count ranges that hold classes."""
    if not counts:
        return
    low, high = min(counts) / 1.3, max(counts) * 1.3
    bands = (("few", low, FEW_THRESHOLD), ("medium", FEW_THRESHOLD, MANY_THRESHOLD + 0.5),
             ("many", MANY_THRESHOLD + 0.5, high))
    for name, start, end in bands:
        start, end = max(start, low), min(end, high)
        if start < end:
            ax.axvspan(start, end, color=GROUP_COLOURS[name], zorder=0)
            ax.text(math.sqrt(start * end), 0.99, name, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8, color="dimgrey")
    ax.set_xlim(low, high)


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _phase_marks(ax: Any, history: Sequence[Mapping[str, Any]]) -> None:
    previous = None
    for row in history:
        phase = row.get("phase")
        if phase and phase != previous and previous is not None:
            ax.axvline(int(row["epoch"]) - 0.5, color="grey", linestyle="--", linewidth=0.8)
        if phase and phase != previous:
            ax.text(int(row["epoch"]) - 0.4, 0.98, str(phase), transform=ax.get_xaxis_transform(),
                    va="top", fontsize=7, color="grey")
        previous = phase


def _phase_of_epoch(config: Mapping[str, Any]) -> dict[int, str]:
    """Epoch (1-based, global) -> phase name, from a trial config (TrialConfig.phase_plan)."""
    if not config:
        return {}
    try:
        from trainables.config import TrialConfig

        plan = TrialConfig.from_dict(dict(config)).phase_plan()
    except (ValueError, TypeError):  # a config from another version: curves without phases
        return {}
    phases, epoch = {}, 0
    for name, epochs in plan:
        for _ in range(epochs):
            epoch += 1
            phases[epoch] = name
    return phases


def _title(result: Mapping[str, Any]) -> str:
    config = result.get("config") or {}
    dataset = config.get("dataset", "?")
    imbalance = (result.get("dataset") or {}).get("imbalance", config.get("imbalance"))
    factor = f", IF {imbalance:g}" if isinstance(imbalance, int | float) else ""
    protocol = result.get("protocol") or config.get("protocol", "")
    method = config.get("method", "?")
    if config.get("dro_epochs"):
        method += f" (radius {config.get('radius')})"
    return f"{method} on {dataset}{factor}, protocol {protocol}"


def _save(fig: Figure, path: Path) -> Path:
    # "tight" bounding box: keeps the legends placed outside the axes in the image
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else math.nan


def _floats(values: Sequence[Any]) -> list[float]:
    return [_float(v) for v in values]


# ------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from results.leaderboard import CliParser, LeaderboardError, resolve_tracking_uri

    parser = CliParser(prog="results/plots.py",
                     description="Log the per-trial plots of recorded trials that lack them.")
    parser.add_argument("--experiment", default="tailtune", help="(default: tailtune)")
    parser.add_argument("--sweep", help="only this sweep's trials")
    parser.add_argument("--storage", default="tailtune_runs", help="(default: ./tailtune_runs)")
    parser.add_argument("--mlflow-uri", help="tracking URI instead of <storage>/mlflow.db")
    parser.add_argument("--force", action="store_true", help="also trials that have plots")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per trial
    try:
        client = MlflowClient(resolve_tracking_uri(args.storage, args.mlflow_uri))
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            raise LeaderboardError(f"unknown experiment {args.experiment!r}; accepted: "
                                   + ", ".join(e.name for e in client.search_experiments()))
    except LeaderboardError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    query = "tags.`tailtune.role` = 'trial'"
    if args.sweep:
        query += f" AND tags.`tailtune.sweep` = '{args.sweep}'"
    done = 0
    for run in client.search_runs([experiment.experiment_id], query, max_results=10_000):
        has_plots = any(a.path == ARTIFACT_DIR for a in client.list_artifacts(run.info.run_id))
        if has_plots and not args.force:
            continue
        try:
            result = result_from_run(client, run.info.run_id)
        except FileNotFoundError:  # stopped early or failed: nothing final to plot
            continue
        logged = log_trial_plots(client, run.info.run_id, result)
        print(f"{run.data.tags.get('tailtune.sweep')}/{run.info.run_name}: {', '.join(logged)}")
        done += 1
    print(f"plots logged for {done} trials")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ARTIFACT_DIR", "PLOT_FILES", "history_from_run", "log_trial_plots",
           "make_trial_plots", "result_from_run"]
