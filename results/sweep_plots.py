"""Per-sweep plots from the sweep's Optuna study, logged to the sweep's parent MLflow run.

Optuna's own visualisation, each as interactive HTML (plotly) and PNG (Optuna's matplotlib
backend; plotly's PNG export needs kaleido and a browser, which a cluster node may not have):

- optimization_history  the objective (validation accuracy) of every completed trial, and the best
                        so far;
- parallel_coordinate   every completed trial as a line through its hyperparameters to its value;
- param_importances     fANOVA importance of each hyperparameter for the objective (needs at least
                        two completed trials and a parameter that varies; skipped otherwise).

Trials ASHA stopped early are PRUNED in the study (search/optuna_search.py), so these plots show
completed trials only, like Optuna's.

    python results/sweep_plots.py --name SWEEP [--storage DIR] [--mlflow-uri URI]

The HTML files load plotly.js from its CDN when opened (small artifacts; the PNGs need nothing);
`plotlyjs=True` / `--offline-html` embeds it instead.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import the package, not the sibling modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

log = logging.getLogger(__name__)

ARTIFACT_DIR = "plots"
OBJECTIVE_NAME = "val_all (validation accuracy)"
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


class SweepPlotError(ValueError):
    """Bad input for the sweep-plot CLI; the message names the value and what is accepted."""


def make_sweep_plots(study: Any, out_dir: str | Path, target_name: str = OBJECTIVE_NAME,
                     plotlyjs: str | bool = "cdn") -> list[Path]:
    """Write `<plot>.html` and `<plot>.png` for each plot that the study can give; returns them.

    A plot Optuna cannot draw for this study (no completed trial; importances with fewer than
    two completed trials or no varying parameter) is skipped with a log message. `plotlyjs`:
    "cdn" loads plotly.js from its CDN when the page opens (a few kB per file); True embeds it
    (about 4.8 MB per file) for viewing without network access.
    """
    import optuna.visualization as plotly_vis
    import optuna.visualization.matplotlib as mpl_vis

    _use_agg_if_unset()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reason = _skip_reason(study)
    written: list[Path] = []
    for name in PLOTS:
        why = reason.get(name)
        if why:
            log.info("sweep plot %s skipped: %s", name, why)
            continue
        plotly_fn: Callable[..., Any] = getattr(plotly_vis, f"plot_{name}")
        mpl_fn: Callable[..., Any] = getattr(mpl_vis, f"plot_{name}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
                figure = plotly_fn(study, target_name=target_name)
                axes = mpl_fn(study, target_name=target_name)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a degenerate study
            log.info("sweep plot %s skipped: %s", name, exc)
            continue
        html = out / f"{name}.html"
        figure.write_html(str(html), include_plotlyjs=plotlyjs, full_html=True)
        written.append(html)
        if name == "parallel_coordinate":  # one axis per parameter: give each room
            width = 1.6 * (_param_count(study) + 1) + 2
            _figure(axes).set_size_inches(max(8.0, width), 5.5)
        written.append(_save_axes(axes, out / f"{name}.png"))
    return written


def log_sweep_plots(client: Any, parent_run_id: str, study: Any,
                    plotlyjs: str | bool = "cdn") -> list[str]:
    """Make the sweep plots and log them to the parent run under `plots/`; returns their paths."""
    with tempfile.TemporaryDirectory(prefix="tailtune-sweep-plots-") as folder:
        files = make_sweep_plots(study, folder, plotlyjs=plotlyjs)
        if files:
            client.log_artifacts(parent_run_id, folder, artifact_path=ARTIFACT_DIR)
    return [f"{ARTIFACT_DIR}/{path.name}" for path in files]


def _skip_reason(study: Any) -> dict[str, str]:
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return {name: "no completed trial in the study" for name in PLOTS}
    reasons = {}
    if len(completed) < 2:
        reasons["param_importances"] = "needs at least two completed trials"
    else:
        varying = [name for name in {k for t in completed for k in t.params}
                   if len({repr(t.params.get(name)) for t in completed}) > 1]
        if not varying:
            reasons["param_importances"] = "no hyperparameter varies over the completed trials"
    if not any(t.params for t in completed):
        reasons["parallel_coordinate"] = "the trials have no hyperparameters"
    return reasons


def _param_count(study: Any) -> int:
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return len({name for trial in completed for name in trial.params})


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
    parser.add_argument("--offline-html", action="store_true",
                        help="embed plotly.js in the HTML files (about 4.8 MB each)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.storage, args.name)
        client = MlflowClient(resolve_tracking_uri(args.storage, args.mlflow_uri))
        run_id = find_parent_run(client, args.name)
        logged = log_sweep_plots(client, run_id, study,
                                 plotlyjs=True if args.offline_html else "cdn")
    except (SweepPlotError, LeaderboardError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"logged {len(logged)} files to run {run_id}: {', '.join(logged) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ARTIFACT_DIR", "PLOTS", "SweepPlotError", "find_parent_run", "load_study",
           "log_sweep_plots", "make_sweep_plots"]
