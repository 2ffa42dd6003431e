"""Per-sweep plots from the sweep's Optuna study, logged to the sweep's parent MLflow run.

Each as interactive HTML (plotly, with plotly.js embedded: the page draws without network
access) and PNG (matplotlib; plotly's PNG export needs kaleido and a browser, which a cluster
node may not have):

- intermediate_values   every trial's validation accuracy per epoch, trials stopped early
                        included (each epoch's objective is an intermediate value of the study,
                        search/book.py): the sweep's learning curves in one figure;
- optimization_history  the objective (validation accuracy) of every completed trial, and the
                        best so far;
- parallel_coordinate   every completed trial as a line through its searched values to its
                        objective, coloured by it (viridis: the worst is dark, never white), and
                        the trials stopped early grey and dashed at their last value; a trial
                        crosses the axis of a value it did not sample, e.g. eps of an erm radius,
                        at "not sampled" below it (drawn here for both HTML and PNG);
- param_importances     fANOVA importance of each hyperparameter for the objective, only from
                        MIN_IMPORTANCE_TRIALS completed trials on (a forest fitted to fewer
                        points ranks noise): skipped otherwise, and notes.txt says so.

Optimization history, parallel coordinates and importances use the completed trials (a trial
stopped early has no final objective); their titles say how many of the sweep's trials that is.
`notes.txt` beside the plots lists what was drawn from how many trials and what was skipped.

    python results/sweep_plots.py --name SWEEP [--storage DIR] [--mlflow-uri URI] [--cdn-html]

`--cdn-html` (plotlyjs="cdn") writes small HTML files that load plotly.js from its CDN instead
(blank without internet access).
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import the package, not the sibling modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

log = logging.getLogger(__name__)

ARTIFACT_DIR = "plots"
OBJECTIVE_NAME = "val_all (validation accuracy)"
PLOTS = ("intermediate_values", "optimization_history", "parallel_coordinate",
         "param_importances")
NOTES_FILE = "notes.txt"
# fANOVA fits a random forest to the completed trials: with fewer points than this its ranking
# follows the noise of a handful of trials (an 8-trial sweep has 2 to 6 completed ones).
MIN_IMPORTANCE_TRIALS = 10
NOT_SAMPLED = -0.12  # where a trial's line crosses the axis of a value it did not sample
COLOURMAP = "viridis"  # dark to bright yellow: no line fades into a white or grey background


class SweepPlotError(ValueError):
    """Bad input for the sweep-plot CLI; the message names the value and what is accepted."""


def make_sweep_plots(study: Any, out_dir: str | Path, target_name: str = OBJECTIVE_NAME,
                     plotlyjs: str | bool = True,
                     min_importance_trials: int = MIN_IMPORTANCE_TRIALS) -> list[Path]:
    """Write `<plot>.html` and `<plot>.png` for each plot that the study can give, and
    notes.txt; returns them (notes.txt last).

    A plot Optuna cannot draw for this study (no completed trial; importances with fewer than
    `min_importance_trials` completed trials or no varying parameter) is skipped, and the note
    says why. `plotlyjs`: True embeds plotly.js (about 4.8 MB a file) so the page works
    offline; "cdn" loads it from its CDN when the page opens.
    """
    import optuna.visualization as plotly_vis
    import optuna.visualization.matplotlib as mpl_vis
    from optuna.trial import TrialState

    _use_agg_if_unset()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    counted = f"{len(completed)} completed of {len(trials)} trials"
    reason = _skip_reason(study, min_importance_trials)
    written: list[Path] = []
    notes: list[str] = []
    for name in PLOTS:
        why = reason.get(name)
        if why:
            log.info("sweep plot %s skipped: %s", name, why)
            notes.append(f"{name}: skipped, {why}")
            continue
        plotly_fn: Callable[..., Any] = getattr(plotly_vis, f"plot_{name}")
        mpl_fn: Callable[..., Any] = getattr(mpl_vis, f"plot_{name}")
        kwargs = {} if name == "intermediate_values" else {"target_name": target_name}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
                if name == "parallel_coordinate":  # drawn here, readable (_parallel_lines)
                    figure, axes = _parallel_figure(study, target_name, counted), None
                else:
                    figure = plotly_fn(study, **kwargs)
                    axes = mpl_fn(study, **kwargs)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a degenerate study
            log.info("sweep plot %s skipped: %s", name, exc)
            notes.append(f"{name}: skipped, {exc}")
            continue
        shown = (f"{_with_intermediate(trials)} trials, stopped early included"
                 if name == "intermediate_values" else counted)
        notes.append(f"{name}: drawn from {shown}")
        if name != "parallel_coordinate":  # its title says it already
            figure.update_layout(title=f"{figure.layout.title.text or name} ({shown})")
        if name == "intermediate_values":
            figure.update_layout(xaxis_title="epoch", yaxis_title=target_name)
        html = out / f"{name}.html"
        figure.write_html(str(html), include_plotlyjs=plotlyjs, full_html=True)
        written.append(html)
        png = out / f"{name}.png"
        if name == "parallel_coordinate":
            written.append(_parallel_png(study, png, target_name, shown))
        else:
            first = _figure(axes).axes[0]
            first.set_title(f"{first.get_title()} ({shown})")
            if name == "intermediate_values":
                first.set_xlabel("epoch")
                first.set_ylabel(target_name)
            written.append(_save_axes(axes, png))
    notes_path = out / NOTES_FILE
    notes_path.write_text("\n".join([f"Sweep plots of study {study.study_name!r}:", *notes])
                          + "\n")
    return [*written, notes_path]


def log_sweep_plots(client: Any, parent_run_id: str, study: Any,
                    plotlyjs: str | bool = True) -> list[str]:
    """Make the sweep plots and log them to the parent run under `plots/`; returns their paths."""
    with tempfile.TemporaryDirectory(prefix="tailtune-sweep-plots-") as folder:
        files = make_sweep_plots(study, folder, plotlyjs=plotlyjs)
        if files:
            client.log_artifacts(parent_run_id, folder, artifact_path=ARTIFACT_DIR)
    return [f"{ARTIFACT_DIR}/{path.name}" for path in files]


def _with_intermediate(trials: list[Any]) -> int:
    return sum(bool(t.intermediate_values) for t in trials)


def _skip_reason(study: Any, min_importance_trials: int = MIN_IMPORTANCE_TRIALS
                 ) -> dict[str, str]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    reasons = {}
    if not any(t.intermediate_values for t in trials):
        reasons["intermediate_values"] = "no trial reported an epoch yet"
    if not completed:
        reasons.update({name: "no completed trial in the study" for name in PLOTS[1:]})
        return reasons
    if len(completed) < min_importance_trials:
        reasons["param_importances"] = (
            f"{len(completed)} completed trials; importances are drawn from "
            f"{min_importance_trials} on (fewer rank noise)")
    else:
        varying = [name for name in {k for t in completed for k in t.params}
                   if len({repr(t.params.get(name)) for t in completed}) > 1]
        if not varying:
            reasons["param_importances"] = "no hyperparameter varies over the completed trials"
    if not any(t.params for t in completed):
        reasons["parallel_coordinate"] = "the trials have no hyperparameters"
    return reasons


@dataclass
class _ParallelLines:
    """Parallel coordinates, drawn by both renderers: one axis per searched value (log axes for
    log-scale dimensions, categories spaced evenly) and the objective last, every position in
    [0, 1] (NOT_SAMPLED below an axis a trial did not sample)."""

    axes: list[tuple[str, list[tuple[float, str]]]]  # (label, ticks [(position, text)])
    lines: list[tuple[list[float], float, bool]]  # (positions, objective, completed), best last
    low: float  # the completed trials' objective range, for the colours
    high: float


def _parallel_lines(study: Any, target_name: str) -> _ParallelLines:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.params]
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    distributions = {k: t.distributions[k] for t in trials for k in t.distributions}

    def value_of(trial: Any) -> float:
        if trial.state == TrialState.COMPLETE:
            return float(trial.value)
        steps = trial.intermediate_values
        return float(steps[max(steps)]) if steps else math.nan

    objectives = [value_of(t) for t in trials]
    axes_spec = []  # (label, to_unit(value) -> [0, 1], ticks [(unit, label)])
    for name in names:
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            choices = [str(c) for c in dist.choices]
            span = max(1, len(choices) - 1)
            axes_spec.append((name, lambda v, c=choices, s=span: c.index(str(v)) / s,
                              [(i / span, c) for i, c in enumerate(choices)]))
            continue
        low, high, log_scale = float(dist.low), float(dist.high), bool(dist.log)
        if log_scale:
            a, b = math.log10(low), math.log10(high)
            axes_spec.append((name + " (log)", lambda v, a=a, b=b: (math.log10(v) - a) / (b - a),
                              [(i / 4, _tick(10 ** (a + (b - a) * i / 4))) for i in range(5)]))
        else:
            axes_spec.append((name, lambda v, lo=low, hi=high: (v - lo) / ((hi - lo) or 1),
                              [(i / 4, _tick(low + (high - low) * i / 4)) for i in range(5)]))
    finite = [v for v in objectives if not math.isnan(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    hi = hi if hi > lo else lo + 1e-9
    axes_spec.append((target_name, lambda v: (v - lo) / (hi - lo),
                      [(i / 4, _tick(lo + (hi - lo) * i / 4)) for i in range(5)]))
    axes = []
    for position, (label, _, ticks) in enumerate(axes_spec):
        if position < len(names) and any(names[position] not in t.params for t in trials):
            ticks = [*ticks, (NOT_SAMPLED, "not sampled")]  # e.g. eps of an erm radius
        axes.append((label, ticks))
    order = sorted(range(len(trials)), key=lambda i: (trials[i].state == TrialState.COMPLETE,
                                                      objectives[i]))
    lines = []
    for i in order:  # the best last: on top
        trial, value = trials[i], objectives[i]
        ys = [spec[1](trial.params[name]) if name in trial.params else NOT_SAMPLED
              for spec, name in zip(axes_spec[:-1], names, strict=True)]
        ys.append(axes_spec[-1][1](value) if not math.isnan(value) else math.nan)
        lines.append((ys, value, trial.state == TrialState.COMPLETE))
    coloured = [v for ys, v, completed in lines if completed and not math.isnan(v)] or [lo, hi]
    # colours span the completed trials only: the worst of them is the darkest
    return _ParallelLines(axes, lines, min(coloured), max(coloured))


def _parallel_png(study: Any, path: Path, target_name: str, shown: str) -> Path:
    """Parallel coordinates as a PNG that reads on paper: completed trials coloured by their
    objective (viridis, dark = worst), trials stopped early grey and dashed at their last
    value; tick labels on white boxes beside their axis."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    drawn = _parallel_lines(study, target_name)
    fig = Figure(figsize=(max(8.0, 2.0 * len(drawn.axes) + 2), 5.5), dpi=110)
    fig.patch.set_facecolor("white")
    ax = fig.add_subplot()
    ax.set_facecolor("white")
    cmap, norm = colormaps[COLOURMAP], Normalize(drawn.low, drawn.high)
    xs = np.arange(len(drawn.axes))
    stopped_label = completed_label = True
    for ys, value, completed in drawn.lines:
        if completed:
            ax.plot(xs, ys, color=cmap(norm(value)), linewidth=2.0, alpha=0.9, zorder=3,
                    label="completed (colour: its objective)" if completed_label else None)
            completed_label = False
        else:
            ax.plot(xs, ys, color="0.55", linewidth=1.2, linestyle="--", zorder=2,
                    label="stopped early (last value)" if stopped_label else None)
            stopped_label = False
    for x, (_label, ticks) in zip(xs, drawn.axes, strict=True):
        ax.plot([x, x], [0, 1], color="black", linewidth=1, zorder=1)
        for unit, text in ticks:
            ax.text(x - 0.04, unit, text, ha="right", va="center", fontsize=7, zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85,
                          "pad": 0.5})
    ax.set_xticks(xs)
    ax.set_xticklabels([label for label, _ in drawn.axes], fontsize=8, rotation=15)
    ax.set_yticks([])
    ax.set_ylim(NOT_SAMPLED - 0.05, 1.05)
    ax.set_xlim(-0.6, len(drawn.axes) - 0.6)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    colourbar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, pad=0.01)
    colourbar.set_label(target_name, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=2, frameon=False)
    ax.set_title(f"Parallel coordinates ({shown}; stopped early trials dashed)", fontsize=9)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _parallel_figure(study: Any, target_name: str, shown: str) -> Any:
    """The same parallel coordinates as the PNG, as a plotly figure for the HTML page (Optuna's
    own draws the worst trial near-white, in Blues, and leaves out the trials stopped early)."""
    import plotly.graph_objects as go
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, to_hex

    drawn = _parallel_lines(study, target_name)
    cmap, norm = colormaps[COLOURMAP], Normalize(drawn.low, drawn.high)
    xs = list(range(len(drawn.axes)))
    figure = go.Figure()
    for ys, value, completed in drawn.lines:
        style = ({"color": to_hex(cmap(norm(value))), "width": 2.5} if completed
                 else {"color": "#8c8c8c", "width": 1.2, "dash": "dash"})
        figure.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", line=style, showlegend=False,
            name="completed" if completed else "stopped early",
            hovertemplate=f"{target_name}: {value:.4g}<extra></extra>"))
    for x, (_label, ticks) in zip(xs, drawn.axes, strict=True):
        figure.add_trace(go.Scatter(x=[x, x], y=[0, 1], mode="lines", showlegend=False,
                                    line={"color": "black", "width": 1}, hoverinfo="skip"))
        for unit, text in ticks:
            figure.add_annotation(x=x, y=unit, text=text, xanchor="right", showarrow=False,
                                  xshift=-4, font={"size": 10}, bgcolor="rgba(255,255,255,0.85)")
    # the colour bar: an invisible marker trace that carries the objective's scale
    figure.add_trace(go.Scatter(
        x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
        marker={"color": [drawn.low, drawn.high], "colorscale": COLOURMAP.capitalize(),
                "cmin": drawn.low, "cmax": drawn.high, "showscale": True,
                "colorbar": {"title": {"text": target_name}}}))
    figure.update_layout(
        title=f"Parallel coordinates ({shown}; stopped early trials dashed)",
        plot_bgcolor="white", margin={"l": 80, "r": 80},
        xaxis={"tickvals": xs, "ticktext": [label for label, _ in drawn.axes],
               "showgrid": False, "zeroline": False},
        yaxis={"visible": False, "range": [NOT_SAMPLED - 0.05, 1.05]})
    return figure


def _tick(value: float) -> str:
    return f"{value:.3g}"


def _figure(axes: Any) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.get_figure()


def _save_axes(axes: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = _figure(axes)
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _use_agg_if_unset() -> None:
    """Optuna's matplotlib plots go through pyplot: pick the file-only Agg backend unless the
    caller (a notebook) already chose one."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")


# ------------------------------------------------------------------------------------- CLI
def load_study(storage: str | Path, name: str) -> Any:
    """The Optuna study of sweep `name` under the results root `storage` (search/sweep.py)."""
    import optuna

    path = Path(storage).expanduser().resolve() / name / "optuna.db"
    if not path.exists():
        raise SweepPlotError(f"no Optuna study for sweep {name!r} at {path}; accepted: a sweep "
                             f"name under --storage {storage}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def find_parent_run(client: Any, name: str) -> str:
    """The parent run id of sweep `name`, searched over every experiment of the store."""
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=(f"tags.`tailtune.role` = 'sweep' AND "
                                                  f"tags.`tailtune.sweep` = '{name}'"))
    if not runs:
        raise SweepPlotError(f"no MLflow parent run for sweep {name!r}; accepted: a sweep "
                             "recorded in this tracking store")
    return runs[0].info.run_id


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from results.leaderboard import CliParser, LeaderboardError, resolve_tracking_uri

    parser = CliParser(prog="results/sweep_plots.py",
                     description="Log a sweep's Optuna plots to its MLflow parent run.")
    parser.add_argument("--name", required=True, help="the sweep name")
    parser.add_argument("--storage", default="tailtune_runs",
                        help="results root of search/run.py (default: ./tailtune_runs)")
    parser.add_argument("--mlflow-uri", help="tracking URI (default: <storage>/mlflow.db)")
    parser.add_argument("--cdn-html", action="store_true",
                        help="load plotly.js from its CDN in the HTML files instead of "
                             "embedding it (small files, blank without internet access)")
    parser.add_argument("--offline-html", action="store_true",
                        help="(the default now) embed plotly.js in the HTML files")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.storage, args.name)
        client = MlflowClient(resolve_tracking_uri(args.storage, args.mlflow_uri))
        run_id = find_parent_run(client, args.name)
        logged = log_sweep_plots(client, run_id, study,
                                 plotlyjs="cdn" if args.cdn_html else True)
    except (SweepPlotError, LeaderboardError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"logged {len(logged)} files to run {run_id}: {', '.join(logged) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ARTIFACT_DIR", "MIN_IMPORTANCE_TRIALS", "NOTES_FILE", "PLOTS", "SweepPlotError",
           "find_parent_run", "load_study", "log_sweep_plots", "make_sweep_plots"]
