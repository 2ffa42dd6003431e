"""Leaderboard across sweeps, spaces, datasets and imbalance factors, read from MLflow.

    python results/leaderboard.py --experiment NAME [--storage DIR | --mlflow-uri URI]
        [--group-by sweep|space] [--top N] [--include stopped_early,failed]
        [--compare SWEEP_OR_SPACE SWEEP_OR_SPACE ...] [--format table|csv|markdown|html]
        [--output FILE]

Reads the trial runs (tag tailtune.role=trial, schema in results/mlflow_logging.py) of one
experiment. Trials are grouped by (sweep or space, dataset, imbalance factor, protocol) and ranked
inside each group by the search objective, validation accuracy `val_all`; test accuracy is shown,
never used to rank. Statuses rank in the trial ledger's one order (search.ledger.ORDER:
completed, stopped_early, unfinished, diverged, failed), the same as the sweep's own report.
Completed and diverged trials are shown; trials stopped early, failed or not yet ended are left
out unless `--include` names them (a footnote counts them, and the configurations beyond --top).
Trials whose configuration is equal except for the seed make one row: mean and standard
deviation over their runs. Under the "paper" protocol the validation metrics are measured on the
test set (the papers' protocol), and every output says so.

Noise: every row carries the standard error of its validation accuracy (binomial over the
validation images, the tag tailtune.val_images; seeds' spread added), its gap to rank 1 in
validation images, and a tie mark when that gap is within TIE_Z standard errors; a footnote
gives the command that breaks the tie (`--confirm K --seeds N`, results/confirm.py). Budget:
epochs per phase and wall time per row; `--compare` says in one line when budgets differ.
Hyperparameters are shown as searched (the `search.<name>` params: what Optuna shows).

Library: `load_trials` -> `select_trials` -> `leaderboard` or `compare` -> `render`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any, NoReturn

if __name__ == "__main__":  # run as a script: import the package, not the sibling modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import pandas as pd  # noqa: E402

from results.mlflow_logging import SEARCH_PREFIX, VAL_IMAGES_TAG  # noqa: E402
from results.store import (  # noqa: E402
    StoreError,
    check_readable_store,
    read_only_uri,
    sqlite_path,
)
from search.ledger import ORDER, Status  # noqa: E402

GROUPS = ("all", "many", "medium", "few")
METRICS = tuple(f"{split}_{group}" for split in ("val", "test") for group in GROUPS)
# A trial's MLflow status tag: the ledger's end statuses, or (not ended) `running` while its
# sweep runs and `interrupted` while it waits for --resume, both the ledger's unfinished.
UNFINISHED_TAGS = ("running", "interrupted")
STATUS_ORDER = (*(s.value for s in ORDER if s.ended), *UNFINISHED_TAGS)  # what --include takes
DEFAULT_STATUSES = ("completed", "diverged")
FORMATS = ("table", "csv", "markdown", "html")
GROUP_BY = ("sweep", "space")
# Params that name where or how a run ran, not what it trained: not part of "the configuration".
NOT_CONFIG = ("seed", "data_dir", "download")
NOT_SHOWN = (*NOT_CONFIG, "dataset", "imbalance", "protocol", "method", "device")
PAPER_LABEL = "paper (val = TEST set)"
PAPER_NOTE = ("protocol 'paper': the papers' protocol, trials were selected on the TEST set, so "
              "their 'val' columns are test accuracy and no honest estimate; for comparison with "
              "published tables only.")
TRIAL_COLUMNS = ("run_id", "experiment", "sweep", "space", "dataset", "source", "imbalance",
                 "protocol",
                 "seed", "method", "trial_id", "status", "run_status", "start_time", "epochs_run",
                 "wall_seconds", "val_images", *METRICS, "params", "searched", "config_key")
# Two rows are "tied" when their validation accuracies differ by less than this many standard
# errors of the difference (a two-sided 95% normal interval).
TIE_Z = 1.96
PHASE_NAMES = {"stage1": "s1", "dro": "dro", "classifier": "cls"}
TIE_MARK = "≈"


class LeaderboardError(ValueError):
    """Bad input (store, experiment, names, options); the message names it and what is accepted."""


# ------------------------------------------------------------------------------------ reading
def resolve_tracking_uri(storage: str | Path | None = "tailtune_runs",
                         mlflow_uri: str | None = None) -> str:
    """The tracking URI to read: `mlflow_uri` as given, else `<storage>/mlflow.db` (search/run.py's
    default store). A local SQLite store must be an SQLite database already: MLflow would make a
    new store of a missing or empty file, and the leaderboard is a reader."""
    if mlflow_uri:
        uri = mlflow_uri
    else:
        path = Path(storage or "tailtune_runs").expanduser().resolve() / "mlflow.db"
        uri = f"sqlite:///{path}"
    database = sqlite_path(uri)
    if database is not None:
        try:
            check_readable_store(database)
        except StoreError as exc:
            raise LeaderboardError(str(exc)) from None
    return uri


def load_trials(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per trial run of `experiment` (columns TRIAL_COLUMNS; missing metrics are NaN)."""
    from mlflow.tracking import MlflowClient

    resolve_tracking_uri(mlflow_uri=tracking_uri)  # a local store must be a database already
    try:
        # Read-only: opening a store MLflow finds incomplete would migrate it (see results.store).
        client = MlflowClient(tracking_uri=read_only_uri(tracking_uri))
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise LeaderboardError(f"unknown experiment {experiment!r} in {tracking_uri}; "
                                   f"accepted: {', '.join(names) or '(none: the store is empty)'}")
        runs = _search_all(client, found.experiment_id, "tags.`tailtune.role` = 'trial'")
    except LeaderboardError:
        raise
    except Exception as exc:  # MLflow raises its own and requests' errors for a dead server
        raise LeaderboardError(f"cannot read MLflow at {tracking_uri}: {_reason(exc)}; accepted: "
                               "a reachable tracking store (--mlflow-uri, --storage)") from exc
    rows = [_trial_row(run, experiment) for run in runs]
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))


def _reason(exc: Exception) -> str:
    text = str(exc)
    unreachable = ("Max retries exceeded", "ConnectionError", "Connection refused")
    if any(mark in text for mark in unreachable):
        return "no server answers there"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _trial_row(run: Any, experiment: str) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    logged = {key: parse_param(value) for key, value in run.data.params.items()}
    # the searched values as sampled (search.<name>) apart from the trial config they made
    searched = {k.removeprefix(SEARCH_PREFIX): v for k, v in logged.items()
                if k.startswith(SEARCH_PREFIX)}
    params = {k: v for k, v in logged.items() if not k.startswith(SEARCH_PREFIX)}
    config = {k: v for k, v in params.items() if k not in NOT_CONFIG}
    # the trial's own clock (trial_seconds, its last epoch); else how long its run was open
    wall = metrics.get("trial_seconds")
    if wall is None and run.info.end_time and run.info.start_time:
        wall = (run.info.end_time - run.info.start_time) / 1000
    return {
        "run_id": run.info.run_id,
        "experiment": experiment,
        "sweep": tags.get("tailtune.sweep", ""),
        "space": tags.get("tailtune.space", ""),
        "dataset": tags.get("tailtune.dataset", params.get("dataset", "")),
        # where the images came from, e.g. "CIFAR-10 (JPEG q75 copy)" (older runs: unknown)
        "source": tags.get("tailtune.source", ""),
        "imbalance": _number(parse_param(tags.get("tailtune.imbalance", "None"))),
        "protocol": tags.get("tailtune.protocol", params.get("protocol", "")),
        "seed": params.get("seed", parse_param(tags.get("tailtune.seed", "None"))),
        "method": tags.get("tailtune.method", params.get("method", "")),
        "trial_id": tags.get("tailtune.trial_id", run.info.run_name or run.info.run_id[:8]),
        "status": tags.get("tailtune.status", "running"),
        "run_status": run.info.status,
        "start_time": run.info.start_time,
        "epochs_run": _number(metrics.get("epochs_run")),
        "wall_seconds": _number(wall),
        "val_images": _number(parse_param(tags.get(VAL_IMAGES_TAG, "None"))),
        **{name: _number(metrics.get(name)) for name in METRICS},
        "params": params,
        "searched": searched,
        "config_key": json.dumps(config, sort_keys=True, default=str),
    }


def parse_param(text: str | None) -> Any:
    """An MLflow param string back to the value it was logged from (str(value))."""
    if text is None or text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _number(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else math.nan


# ------------------------------------------------------------------------------------ tables
def parse_include(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Extra statuses to show besides completed and diverged ('all' for every status)."""
    if text is None:
        return ()
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    accepted = (*STATUS_ORDER, "all")
    for item in items:
        if item not in accepted:
            raise LeaderboardError(f"--include {item!r} is not a trial status; accepted: "
                                   f"{', '.join(accepted)} (comma-separated)")
    return tuple(items)


def select_trials(trials: pd.DataFrame, include: Iterable[str] = ()) -> pd.DataFrame:
    """Trials whose status is completed, diverged or one of `include` ('all': every trial)."""
    include = tuple(include)
    if "all" in include:
        return trials.copy()
    keep = {*DEFAULT_STATUSES, *include}
    return trials[trials["status"].isin(keep)].copy()


def leaderboard(trials: pd.DataFrame, group_by: str = "sweep", top: int = 5) -> pd.DataFrame:
    """Top `top` configurations per (sweep or space, dataset, imbalance, protocol) by val_all.

    One row per configuration: runs equal in every param but the seed are one row with the mean
    of each metric (and `<metric>_std`, the sample standard deviation, for 2+ runs). Every row
    carries the noise of its validation accuracy (`val_se`, see `standard_error`), its distance
    to rank 1 in validation images (`gap_images`) and whether that distance is within noise
    (`tied`: within TIE_Z standard errors of the difference, same status as rank 1); its budget
    (`phases`: epochs per phase, `wall_seconds`: the mean trial wall time). The frame's
    attrs["hidden"] counts, per group, the configurations beyond `top`.
    """
    if group_by not in GROUP_BY:
        raise LeaderboardError(f"--group-by {group_by!r}; accepted: {', '.join(GROUP_BY)}")
    if top < 1:
        raise LeaderboardError(f"--top must be an integer >= 1; got {top}")
    keys = [group_by, "dataset", "imbalance", "protocol"]
    columns = [*keys, "rank", "trial", "status", "epochs_run", "total_epochs", "phases",
               "wall_seconds", "runs", "seeds", *METRICS, *(f"{m}_std" for m in METRICS),
               "val_images", "val_se", "gap_images", "tied", "hyperparameters", "run_ids"]
    if trials.empty:
        frame = pd.DataFrame(columns=columns)
        frame.attrs["hidden"] = {}
        return frame
    rows, hidden = [], {}
    for key, group in trials.groupby(keys, dropna=False, sort=False):
        shown = key_params(group)
        configs = [_config_row(config, group_by) for _, config in
                   group.groupby("config_key", sort=False)]
        configs.sort(key=_rank_key)
        _mark_noise(configs)
        if len(configs) > top:
            hidden[key[0]] = len(configs) - top
        for rank, row in enumerate(configs[:top], 1):
            del row["_status_rank"], row["_started"]
            params, searched = row.pop("params"), row.pop("searched")
            hyper = {name: searched.get(name) if searched else params.get(name)
                     for name in shown}
            rows.append({**dict(zip(keys, key, strict=True)), "rank": rank, **row,
                         "hyperparameters": hyper})
    frame = pd.DataFrame(rows, columns=columns)
    order = frame.assign(_imb=frame["imbalance"].fillna(math.inf))
    order = order.sort_values(["dataset", "_imb", "protocol", group_by, "rank"], kind="stable")
    frame = order.drop(columns="_imb").reset_index(drop=True)
    frame.attrs["hidden"] = hidden
    return frame


def standard_error(val_all: float, val_images: float, std: float = math.nan,
                   runs: int = 1) -> float:
    """Standard error of a (mean) validation accuracy.

    The validation split is balanced, so `val_all` (the mean per-class accuracy) is the share of
    its `val_images` images classified right: binomial, sqrt(p (1 - p) / n) (an upper bound for
    the per-class mean). With several seeds the seed-to-seed noise of their mean, std / sqrt(k),
    adds to it in quadrature: the seeds share one validation set, so more seeds shrink the
    training noise, never the sampling noise of the validation set. Unknown n: the seed part
    alone (NaN for one run).
    """
    parts = []
    if not math.isnan(val_all) and val_images > 0:
        parts.append(val_all * (1 - val_all) / val_images)
    if runs > 1 and not math.isnan(std):
        parts.append(std ** 2 / runs)
    return math.sqrt(sum(parts)) if parts else math.nan


def _mark_noise(configs: list[dict[str, Any]]) -> None:
    """Standard error, gap to rank 1 (in validation images) and the tie mark of ranked rows."""
    for row in configs:
        row["val_se"] = standard_error(row["val_all"], row["val_images"], row["val_all_std"],
                                       row["runs"])
    first = configs[0] if configs else None
    for position, row in enumerate(configs):
        row["gap_images"], row["tied"] = math.nan, False
        if first is None or math.isnan(first["val_all"]) or math.isnan(row["val_all"]):
            continue
        gap = first["val_all"] - row["val_all"]
        if row["val_images"] > 0:
            row["gap_images"] = gap * row["val_images"]
        spread = math.hypot(first["val_se"], row["val_se"])
        row["tied"] = bool(position > 0 and row["_status_rank"] == first["_status_rank"]
                           and not math.isnan(spread) and gap <= TIE_Z * spread)


def compare(trials: pd.DataFrame, names: Sequence[str], top: int = 5,
            everything: pd.DataFrame | None = None) -> pd.DataFrame:
    """Sweeps or spaces side by side: one row per (dataset, imbalance, protocol, rank), a block
    of columns per name. `everything` (all trials, any status) is where names are looked up, so a
    sweep whose trials are all filtered out is known but shows no row."""
    if len(names) < 2:
        raise LeaderboardError(f"--compare needs two or more sweeps or spaces; got {len(names)}")
    pool = trials if everything is None else everything
    sweeps, spaces = set(pool["sweep"]), set(pool["space"])
    keys = ["dataset", "imbalance", "protocol", "rank"]
    merged: pd.DataFrame | None = None
    for name in names:
        if name in sweeps:
            board = leaderboard(trials[trials["sweep"] == name], "sweep", top)
        elif name in spaces:  # trials labelled sweep/trial: a space spans sweeps
            board = leaderboard(trials[trials["space"] == name], "space", top)
        else:
            accepted = ", ".join(sorted(sweeps | spaces)) or "(none)"
            raise LeaderboardError(f"--compare {name!r} is neither a sweep nor a space of this "
                                   f"experiment; accepted: {accepted}")
        # validation by group (the objective and what it hides), test by group, the noise and
        # the budget: what tells sweeps apart, and whether they are comparable at all
        block = board[keys + ["trial", "phases", "wall_seconds", *METRICS,
                              *(f"{m}_std" for m in METRICS), "val_se", "tied"]]
        block = block.rename(columns={c: f"{name}: {c}" for c in block.columns if c not in keys})
        merged = block if merged is None else merged.merge(block, on=keys, how="outer")
    assert merged is not None
    merged = merged.assign(_imb=merged["imbalance"].fillna(math.inf))
    merged = merged.sort_values(["dataset", "_imb", "protocol", "rank"], kind="stable")
    return merged.drop(columns="_imb").reset_index(drop=True)


def budget_note(trials: pd.DataFrame, names: Sequence[str]) -> str | None:
    """One line when the compared sweeps or spaces trained with different epoch budgets."""
    budgets: dict[str, set[str]] = {}
    for name in names:
        chosen = trials[(trials["sweep"] == name) | (trials["space"] == name)]
        budgets[name] = {phase_budget(p) for p in chosen["params"]} - {""}
    if len({frozenset(b) for b in budgets.values() if b}) <= 1:
        return None
    text = "; ".join(f"{name} {' or '.join(sorted(b)) or '?'}" for name, b in budgets.items())
    return (f"Budgets differ (epochs per phase): {text}. Their accuracies are not measured at "
            "equal training; compare with care.")


def key_params(group: pd.DataFrame) -> list[str]:
    """The hyperparameters worth a column: the searched values where the runs logged them (as
    sampled: what Optuna shows), else the space's searched fields, then any other param that
    varies inside the group."""
    searched = [s for s in group["searched"] if s] if "searched" in group else []
    if searched:
        names = list(dict.fromkeys(k for s in searched for k in s))
        order = [d for space in sorted({s for s in group["space"] if s})
                 for d in _space_dimensions(space)]
        return sorted(names, key=lambda n: order.index(n) if n in order else len(order))
    names: list[str] = []
    spaces = {s for s in group["space"] if s}
    for space_name in sorted(spaces):
        names += [n for n in _space_fields(space_name) if n not in names]
    params = list(group["params"])
    every = sorted({k for p in params for k in p})
    for name in every:
        if name in NOT_SHOWN or name in names:
            continue
        if len({json.dumps(p.get(name), default=str) for p in params}) > 1:
            names.append(name)
    present = {k for p in params for k in p}
    return [n for n in names if n in present]


def _space_dimensions(name: str) -> list[str]:
    try:
        from spaces import get_space

        return [dim.name for dim in get_space(name).dimensions]
    except (ImportError, ValueError):
        return []


def _space_fields(name: str) -> list[str]:
    try:
        from spaces import get_space

        space = get_space(name)
    except (ImportError, ValueError):  # a space this version does not know: varying params only
        return []
    return [dim.config_field for dim in space.dimensions if not dim.derived]


def _config_row(config: pd.DataFrame, group_by: str) -> dict[str, Any]:
    config = config.sort_values("start_time", kind="stable")
    statuses = list(config["status"])
    trial_ids = [f"{s}/{t}" if group_by == "space" else str(t)
                 for s, t in zip(config["sweep"], config["trial_id"], strict=True)]
    images = config["val_images"].dropna()
    row: dict[str, Any] = {
        "trial": "+".join(trial_ids),
        "status": statuses[0] if len(set(statuses)) == 1 else "mixed: " + ",".join(statuses),
        "epochs_run": float(config["epochs_run"].min()),
        "total_epochs": total_epochs(config["params"].iloc[0]),
        "phases": phase_budget(config["params"].iloc[0]),
        "wall_seconds": float(config["wall_seconds"].mean()),
        "val_images": float(images.iloc[0]) if len(images) else math.nan,
        "runs": len(config),
        "seeds": ",".join(str(s) for s in sorted(set(config["seed"]), key=str)),
        "params": config["params"].iloc[0],
        "searched": config["searched"].iloc[0],
        "run_ids": " ".join(config["run_id"]),
        "_status_rank": min(_status_rank(s) for s in statuses),
        "_started": int(config["start_time"].min()),
    }
    for metric in METRICS:
        values = config[metric].dropna()
        row[metric] = float(values.mean()) if len(values) else math.nan
        row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return row


def total_epochs(params: dict[str, Any]) -> int | None:
    """Epochs a trial of this configuration runs to its end, over all phases (TrialConfig)."""
    try:
        from trainables.config import TrialConfig

        return TrialConfig.from_dict(dict(params)).total_epochs
    except (ValueError, TypeError):  # params of another version: unknown
        return None


def phase_budget(params: dict[str, Any]) -> str:
    """Epochs per phase of a configuration, e.g. "s1 4 + dro 1 + cls 1" ("" if unknown)."""
    try:
        from trainables.config import TrialConfig

        plan = TrialConfig.from_dict(dict(params)).phase_plan()
    except (ValueError, TypeError):  # params of another version: unknown
        return ""
    return " + ".join(f"{PHASE_NAMES.get(name, name)} {epochs}" for name, epochs in plan)


def _status_rank(status: str) -> int:
    """The ledger's one order (search.ledger.ORDER); an unknown tag ranks last."""
    if status in UNFINISHED_TAGS:
        return Status.UNFINISHED.rank
    return Status(status).rank if status in STATUS_ORDER else len(ORDER)


def _rank_key(row: dict[str, Any]) -> tuple[int, float, int]:
    """Status first, then validation accuracy; ties go to the configuration that ran first."""
    val = row["val_all"]
    return row["_status_rank"], -val if not math.isnan(val) else math.inf, row["_started"]


# ------------------------------------------------------------------------------------ output
def render(frame: pd.DataFrame, fmt: str, title: str = "", notes: Sequence[str] = ()) -> str:
    """The table as text: a terminal table, CSV (raw fractions, every column), Markdown or HTML.

    table / markdown / html show accuracy in % ("mean ± std" over seeds), hyperparameters in one
    column, and label paper-protocol rows.
    """
    if fmt not in FORMATS:
        raise LeaderboardError(f"--format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if fmt == "csv":
        return _csv_frame(frame).to_csv(index=False)
    shown = display_frame(frame)
    if fmt == "table":
        body = (shown.to_markdown(index=False, tablefmt="simple", disable_numparse=True)
                if len(shown) else "(no trials)")
        return "\n".join([title, "", body, "", *notes]).strip() + "\n"
    if fmt == "markdown":
        body = shown.to_markdown(index=False, disable_numparse=True) if len(shown) else \
            "_No trials._"
        parts = [f"## {title}" if title else "", body, "\n".join(f"- {n}" for n in notes)]
        return "\n\n".join(p for p in parts if p) + "\n"
    body = shown.to_html(index=False, border=0, na_rep="-", classes="leaderboard")
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body><h2>{escape(title)}</h2>\n{body}\n"
            f"<ul>{items}</ul></body></html>\n")


_CSS = ("body{font-family:sans-serif} table{border-collapse:collapse} "
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right} "
        "th{background:#f0f0f0}")


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Human-facing version of a leaderboard or compare frame (strings, % with 2 decimals)."""
    shown = pd.DataFrame(index=frame.index)
    for column in frame.columns:
        base = column.split(": ", 1)[-1]
        if base.endswith("_std") or base in ("run_ids", "val_images"):
            continue
        values = frame[column]
        prefix = column[: len(column) - len(base)]
        if base == "tied":
            shown[prefix + "tie"] = [TIE_MARK if v is True else "" for v in values]
        elif base == "val_se":
            shown[prefix + "val SE"] = ["-" if _missing(v) else f"±{v * 100:.2f}"
                                        for v in values]
        elif base == "gap_images":
            shown[prefix + "gap (val img)"] = ["-" if _missing(v) else _images(v)
                                               for v in values]
        elif base == "wall_seconds":
            shown[prefix + "wall"] = [_duration(v) for v in values]
        elif base == "phases":
            shown[prefix + "epochs/phase"] = ["-" if not v else str(v) for v in values]
        elif base in METRICS:
            std = frame.get(f"{column}_std")
            shown[column] = [_pct(v, None if std is None else std.iloc[i])
                             for i, v in enumerate(values)]
        elif column == "imbalance":
            shown[column] = [_factor(v) for v in values]
        elif column == "epochs_run":
            totals = frame.get("total_epochs", pd.Series([None] * len(frame), index=frame.index))
            shown["epochs"] = [("-" if _missing(v) else f"{v:.0f}")
                               + ("" if _missing(t) else f"/{t:.0f}")
                               for v, t in zip(values, totals, strict=True)]
        elif column == "total_epochs":
            continue
        elif column == "protocol":
            shown[column] = [PAPER_LABEL if v == "paper" else v for v in values]
        elif column == "hyperparameters":
            shown[column] = [" ".join(f"{k}={_short(v)}" for k, v in h.items()) for h in values]
        else:
            shown[column] = ["-" if _missing(v) else str(v) for v in values]
    if "tie" in shown.columns and "rank" in shown.columns:  # the mark beside the rank
        order = list(shown.columns)
        order.remove("tie")
        order.insert(order.index("rank") + 1, "tie")
        shown = shown[order]
    return shown.rename(columns=lambda c: c.replace("_all", " all").replace("_many", " many")
                        .replace("_medium", " med").replace("_few", " few")
                        if c.split(": ", 1)[-1] in METRICS else c)


def _images(value: float) -> str:
    """A gap in validation images: whole for single runs, one decimal for means over seeds."""
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def _duration(value: Any) -> str:
    if _missing(value):
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def _csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    if "hyperparameters" in out.columns:
        names = list(dict.fromkeys(k for h in out["hyperparameters"] for k in h))
        for name in names:
            out[f"hp.{name}"] = [h.get(name) for h in out["hyperparameters"]]
        out = out.drop(columns="hyperparameters")
    return out


def _pct(value: Any, std: Any = None) -> str:
    if _missing(value):
        return "-"
    text = f"{value * 100:.2f}"
    return text if _missing(std) else f"{text} ± {std * 100:.2f}"


def _factor(value: Any) -> str:
    return "natural" if _missing(value) else f"{value:g}"


def _short(value: Any) -> str:
    if value is None:  # not searched for this trial (e.g. eps of an erm radius)
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def default_notes(trials: pd.DataFrame, include: Sequence[str] = ()) -> list[str]:
    """What the reader must know about `trials` (the ones the table was drawn from, any status):
    how rows are ranked, which statuses were left out, the paper protocol."""
    notes = ["Ranked by validation accuracy (val all, the search objective); test accuracy is "
             "reported, never used to rank. Accuracy in %; 'a ± b': mean ± standard deviation "
             "over runs of one configuration with different seeds."]
    if "all" not in include:
        left = trials[~trials["status"].isin({*DEFAULT_STATUSES, *include})]
        if len(left):
            counts = left["status"].value_counts()
            text = ", ".join(f"{n} {s}" for s, n in counts.items())
            notes.append(f"Not shown: {text} trials (use --include {','.join(counts.index)}).")
    if (trials["protocol"] == "paper").any():
        notes.append(PAPER_NOTE)
    return notes


def noise_notes(board: pd.DataFrame, confirm_hint: str = "") -> list[str]:
    """How to read the noise columns, and for every group whose rank 1 is tied, how to break
    the tie (`confirm_hint`: the command line the rows were drawn with, e.g. `python
    results/leaderboard.py --experiment X`; --sweep, --confirm and --seeds are added)."""
    if board.empty:
        return []
    images = board["val_images"].dropna()
    size = f"{images.iloc[0]:.0f}" if images.nunique() == 1 else "the"
    one = (f", where 1 image = {100 / images.iloc[0]:.2f} points" if images.nunique() == 1
           else "")
    notes = [f"val SE: standard error of val all in points (binomial over {size} validation "
             f"images{one}; with several seeds, their spread added). gap: rank 1's lead in "
             f"validation images. {TIE_MARK}: tied with rank 1 (the lead is within "
             f"{TIE_Z} standard errors of the difference: noise, not a winner)."]
    group = next(c for c in GROUP_BY if c in board.columns)
    for name, rows in board.groupby(group, sort=False):
        tied = int(rows["tied"].sum())
        if not tied:
            continue
        k = tied + 1
        where = "sweep" if group == "sweep" else "space"
        command = f"{confirm_hint} --{where} {name} --confirm {k} --seeds 3".strip()
        notes.append(f"{where} {name}: rank 1 is tied with {tied} other configuration"
                     f"{'s' if tied > 1 else ''}. To break the tie, re-run the top {k} with more "
                     f"seeds (mean ± std on validation and test): {command}")
    return notes


def hidden_notes(board: pd.DataFrame, top: int) -> list[str]:
    """Configurations the --top limit left out, per group (none is hidden silently)."""
    hidden = board.attrs.get("hidden") or {}
    return [f"Not shown: {n} more configuration{'s' if n > 1 else ''} of {name} beyond --top "
            f"{top} (use --top {top + n})." for name, n in hidden.items()]


# ------------------------------------------------------------------------------------ CLI
class CliParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="results/leaderboard.py",
                description="Top trials per sweep or space, dataset and imbalance factor, read "
                            "from MLflow; ranked by validation accuracy.")
    p.add_argument("--experiment", default="tailtune", help="MLflow experiment (default: tailtune)")
    p.add_argument("--storage", default="tailtune_runs",
                   help="results root of search/run.py, holding mlflow.db (default: "
                        "./tailtune_runs)")
    p.add_argument("--mlflow-uri", help="tracking URI instead, e.g. http://HOST:5000")
    p.add_argument("--group-by", default="sweep", choices=GROUP_BY,
                   help="rank within each sweep or each space (default: sweep)")
    p.add_argument("--top", type=int, default=5, help="rows per group (default: 5)")
    p.add_argument("--include", help="also show these statuses: stopped_early, failed, running, "
                                     "or all (comma-separated)")
    p.add_argument("--compare", nargs="+", metavar="SWEEP_OR_SPACE",
                   help="two or more sweeps or spaces side by side")
    p.add_argument("--sweep", help="only this sweep's trials")
    p.add_argument("--space", help="only this space's trials")
    p.add_argument("--format", default="table", choices=FORMATS, help="(default: table)")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.add_argument("--confirm", type=int, metavar="K",
                   help="re-run the top K completed configurations of the (one) sweep or space "
                        "selected with --seeds new seeds each, record them in MLflow as the "
                        "sweep <name>-confirm, and print mean ± std on validation and test")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration for --confirm "
                                                        "(default: 3)")
    p.add_argument("--cache-dir", help="stage-1 cache for --confirm (default: "
                                       "<storage>/stage1_cache, the sweeps' own)")
    p.add_argument("--data-dir", help="dataset folder for --confirm, if not the trials' own")
    return p


def run(args: argparse.Namespace) -> str:
    uri = resolve_tracking_uri(args.storage, args.mlflow_uri)
    include = parse_include(args.include)
    everything = _only(load_trials(uri, args.experiment), args)
    trials = select_trials(everything, include)
    if args.confirm is not None:
        from results.confirm import confirm_command  # torch and the pipeline: only here

        return confirm_command(args, uri, everything)
    if args.compare:
        frame = compare(trials, args.compare, args.top, everything=everything)
        chosen = everything["sweep"].isin(args.compare) | everything["space"].isin(args.compare)
        notes = default_notes(everything[chosen], include)
        budgets = budget_note(everything[chosen], args.compare)
        notes += [budgets] if budgets else []
        title = (f"Experiment {args.experiment!r}: {' vs '.join(args.compare)} "
                 f"(top {args.top} each)")
    else:
        frame = leaderboard(trials, args.group_by, args.top)
        notes = [*default_notes(everything, include), *hidden_notes(frame, args.top),
                 *noise_notes(frame, cli_prefix(args))]
        title = (f"Experiment {args.experiment!r}: top {args.top} per {args.group_by}, dataset "
                 f"and imbalance factor ({len(everything)} trials)")
    return render(frame, args.format, title, notes)


def _only(trials: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """The trials of --sweep / --space (all when neither is given)."""
    for column in ("sweep", "space"):
        name = getattr(args, column, None)
        if name is None:
            continue
        if name not in set(trials[column]):
            accepted = ", ".join(sorted(set(trials[column]) - {""})) or "(none)"
            raise LeaderboardError(f"--{column} {name!r} is not a {column} of this experiment; "
                                   f"accepted: {accepted}")
        trials = trials[trials[column] == name]
    return trials


def cli_prefix(args: argparse.Namespace) -> str:
    """The command line that reads the same store and experiment (for the hints printed)."""
    where = (f"--mlflow-uri {args.mlflow_uri}" if args.mlflow_uri
             else "" if args.storage == "tailtune_runs" else f"--storage {args.storage}")
    return " ".join(p for p in ("python results/leaderboard.py", where,
                                f"--experiment {args.experiment}") if p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A dead server should fail in seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        text = run(args)
    except LeaderboardError as exc:
        print(f"{build_parser().prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            print(f"{build_parser().prog}: error: cannot write --output {args.output!r}: "
                  f"{exc.strerror}; accepted: a writable file path", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["FORMATS", "TIE_Z", "CliParser", "LeaderboardError", "budget_note", "compare",
           "display_frame", "hidden_notes", "leaderboard", "load_trials", "main", "noise_notes",
           "parse_include", "parse_param", "phase_budget", "render", "resolve_tracking_uri",
           "select_trials", "standard_error"]
