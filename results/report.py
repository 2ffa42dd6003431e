"""Reproduction report: this project's best measured numbers beside the published ones.

    python results/report.py --experiment NAME [--storage DIR | --mlflow-uri URI]
        [--output report.md]

For every dataset in the experiment, a Markdown table of methods by imbalance factor: the test
accuracy (All / Many / Medium / Few, %) of the trial with the best validation accuracy among the
completed trials of that method, dataset, imbalance factor and protocol; the published numbers of
docs/methods.md sections 4 and 5 (results/published.py); the gap (ours minus published, in points);
and the protocol. Published numbers are CIFAR-100-LT (ImageNet-LT, iNaturalist 2018 for a few
lines): for any other dataset they are shown for reference only and the gap is "n/a (different
dataset)". Nothing is filled in: a method without a completed trial is "not measured", a number a
paper does not give is "-". The report leads with what was measured (a table per dataset); the
published lines nothing was measured for follow, one compact line each.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import the package, not the sibling modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import pandas as pd  # noqa: E402

from results.leaderboard import (  # noqa: E402
    CliParser,
    LeaderboardError,
    load_trials,
    resolve_tracking_uri,
)
from results.published import (  # noqa: E402
    CIFAR_FACTORS,
    PUBLISHED,
    Published,
    published_methods,
)
from trainables.methods import METHODS, get_method  # noqa: E402

REFERENCE_DATASET = "cifar100_lt"
NOT_MEASURED = "not measured"
OTHER_DATASET = "n/a (different dataset)"
GROUPS = ("all", "many", "medium", "few")
PROTOCOLS = {"holdout": "holdout (selected on validation)",
             "paper": "paper (selected on TEST)"}
def method_key(params: Mapping[str, Any]) -> str:
    """What a trial ran, as the key published numbers are matched on (results/published.py):
    its method's `report_key` (trainables.methods), e.g. "dro_lt/learned", "wb/cb+maxnorm"."""
    return get_method(params.get("method", "ce")).report_key(params)


def method_name(key: str) -> str:
    """The readable name a method gives a report key; a key no registered method names (a
    trial of a method this version no longer has) is shown as it is."""
    for method in METHODS.values():
        if key in method.report_names:
            return method.report_names[key]
    return key


def best_measured(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, imbalance, method key, protocol): the completed trial with the best val_all
    (earliest on ties). Test accuracy is what the report shows; it never selects."""
    done = trials[(trials["status"] == "completed") & trials["val_all"].notna()].copy()
    if done.empty:
        return done.assign(method_key=pd.Series(dtype=str))
    done["method_key"] = [method_key(p) for p in done["params"]]
    done = done.sort_values(["val_all", "start_time"], ascending=[False, True], kind="stable")
    keys = ["dataset", "imbalance", "method_key", "protocol"]
    return done.groupby(keys, dropna=False, sort=False).head(1).reset_index(drop=True)


def report_tables(trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Dataset -> its table (string cells), datasets in name order, CIFAR-100-LT always present."""
    best = best_measured(trials)
    datasets = sorted({REFERENCE_DATASET, *best["dataset"]})
    return {dataset: _dataset_table(dataset, best[best["dataset"] == dataset])
            for dataset in datasets}


def _dataset_table(dataset: str, best: pd.DataFrame) -> pd.DataFrame:
    own = [p for p in PUBLISHED if p.dataset == dataset]
    reference = dataset if own else REFERENCE_DATASET
    factors = sorted({*_factors(best), *(CIFAR_FACTORS if dataset == REFERENCE_DATASET else ())},
                     key=lambda f: -math.inf if f is None else -f)
    if not factors:
        factors = [None]
    keys = list(dict.fromkeys([*published_methods(), *sorted(set(best["method_key"]))]))
    rows = []
    for key in keys:
        lines = [p for p in PUBLISHED if p.method == key and p.dataset == reference] or [None]
        for factor in factors:
            measured = best[(best["method_key"] == key) & _same_factor(best["imbalance"], factor)]
            for line in lines:
                if measured.empty:
                    rows.append(_row(key, line, factor, None, dataset))
                for _, trial in measured.iterrows():
                    rows.append(_row(key, line, factor, trial, dataset))
    return pd.DataFrame(rows)


def _row(key: str, line: Published | None, factor: float | None, trial: Any,
         dataset: str) -> dict[str, str]:
    ours = None if trial is None else [_number(trial[f"test_{g}"]) for g in GROUPS]
    theirs = _published_values(line, factor)
    if line is not None and line.dataset != dataset:
        gap = OTHER_DATASET
    elif ours is None or theirs is None:
        gap = "-"
    else:
        gap = " / ".join(_signed(a * 100 - b) if a is not None and b is not None else "-"
                         for a, b in zip(ours, theirs, strict=True))
    protocol = "-" if trial is None else PROTOCOLS.get(trial["protocol"], trial["protocol"])
    return {
        "method": f"{method_name(key)} (`{key}`)",
        "published line": "-" if line is None else f"{line.label} ({_short_source(line)})",
        "IF": _factor(factor),
        "protocol": protocol,
        "ours: all / many / med / few": NOT_MEASURED if ours is None else _cells(
            [None if v is None else v * 100 for v in ours]),
        "published: all / many / med / few": "-" if theirs is None else _cells(theirs),
        "gap (points)": gap,
        "selected trial": "-" if trial is None else _trial_cell(trial),
    }


def _published_values(line: Published | None, factor: float | None) -> list[float | None] | None:
    if line is None:
        return None
    # A natural-imbalance line (ImageNet-LT, iNaturalist) stands for any factor of its dataset.
    keyed = None if None in line.overall else factor
    if keyed not in line.overall:
        return None
    groups = line.groups.get(keyed)
    return [line.overall[keyed], *(groups if groups else (None, None, None))]


def _same_factor(column: pd.Series, factor: float | None) -> pd.Series:
    if factor is None:
        return column.isna()
    return (column - factor).abs() < 1e-9


def _factors(best: pd.DataFrame) -> set[float | None]:
    return {None if _number(v) is None else float(v) for v in best["imbalance"]}


def _trial_cell(trial: Any) -> str:
    epochs = _number(trial["epochs_run"])
    model = trial["params"].get("model") or "default model"
    text = f"{trial['sweep']}/{trial['trial_id']}, val all {trial['val_all'] * 100:.2f}"
    return text + (f", {epochs:.0f} epochs" if epochs is not None else "") + f", {model}"


def _short_source(line: Published) -> str:
    paper = line.source.split(" (")[0]  # "DRO-LT", "Weight Balancing"
    # CIFAR backbones are stated once in the report's header; the others differ per line.
    return paper if line.dataset == REFERENCE_DATASET else f"{paper}, {line.backbone}"


def _cells(values: Sequence[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _factor(value: float | None) -> str:
    return "natural" if value is None else f"{value:g}"


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def render_report(trials: pd.DataFrame, experiment: str, tracking_uri: str) -> str:
    """The whole report as Markdown: what was measured first (a table per dataset), then the
    published lines nothing was measured for, one compact line each."""
    counts = trials["status"].value_counts() if len(trials) else pd.Series(dtype=int)
    status_text = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"
    lines = [
        f"# Reproduction report: experiment `{experiment}`",
        "",
        f"Tracking store `{tracking_uri}`; {len(trials)} trials ({status_text}); generated "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "- **ours**: test accuracy (%) of the completed trial with the best *validation* "
        "accuracy for that method, dataset, imbalance factor (IF) and protocol. Test accuracy is "
        "never used to select, except under the paper protocol, where the papers' own practice "
        "(selection on the test set) is reproduced for comparison and labelled so.",
        "- **published**: docs/methods.md sections 4 and 5 (CIFAR-100-LT, ResNet-32; the Weight "
        "Balancing authors' code used a ResNet-34). Many / Medium / Few are published at IF 100 "
        "only.",
        "- **gap**: ours minus published, in percentage points, for all / many / med / few.",
        f"- **{NOT_MEASURED}**: no completed trial of that method at that IF in this "
        "experiment, listed after the measurements. Numbers are never filled in.",
        "",
        "## Measured",
    ]
    tables = report_tables(trials)
    measured = {d: t[t["ours: all / many / med / few"] != NOT_MEASURED] for d, t in tables.items()}
    if not any(len(t) for t in measured.values()):
        lines += ["", "No completed trial in this experiment."]
    for dataset, table in measured.items():
        if table.empty:
            continue
        lines += ["", f"### {dataset}", ""]
        sources = sorted({s for s in trials.loc[trials["dataset"] == dataset, "source"] if s})
        if sources:
            lines += [f"Data: {'; '.join(sources)}.", ""]
        if dataset != REFERENCE_DATASET and not any(p.dataset == dataset for p in PUBLISHED):
            lines += [f"No published numbers for {dataset}: the published column shows "
                      "CIFAR-100-LT at the same imbalance factor, for reference only.", ""]
        lines.append(table.to_markdown(index=False, disable_numparse=True))
    lines += ["", f"## {NOT_MEASURED.capitalize()}", ""]
    for dataset, table in tables.items():
        lines += _unmeasured_lines(dataset, table[table["ours: all / many / med / few"]
                                                  == NOT_MEASURED])
    return "\n".join(lines) + "\n"


def _unmeasured_lines(dataset: str, rows: pd.DataFrame) -> list[str]:
    """One line per published line without a measurement (its numbers at every IF), or, for a
    dataset without published numbers of its own, one line naming the methods."""
    if rows.empty:
        return []
    own = dataset == REFERENCE_DATASET or any(p.dataset == dataset for p in PUBLISHED)
    if not own:
        methods = ", ".join(dict.fromkeys(rows["method"]))
        return [f"- {dataset}, IF {' / '.join(dict.fromkeys(rows['IF']))}: {methods} (their "
                f"published CIFAR-100-LT numbers are listed under {REFERENCE_DATASET})"]
    out = []
    for (method, line), group in rows.groupby(["method", "published line"], sort=False):
        values = "; ".join(f"IF {r['IF']}: " + r["published: all / many / med / few"]
                           .removesuffix(" / - / - / -")  # groups published at one IF only
                           for _, r in group.iterrows()
                           if r["published: all / many / med / few"] != "-")
        where = "" if line == "-" else f", {line}"
        out.append(f"- {dataset}: {method}{where}: published {values or 'nothing'}")
    return out


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> CliParser:
    p = CliParser(prog="results/report.py",
                description="Best measured accuracy per method and imbalance factor beside the "
                            "published numbers, as Markdown.")
    p.add_argument("--experiment", default="tailtune", help="MLflow experiment (default: tailtune)")
    p.add_argument("--storage", default="tailtune_runs",
                   help="results root holding mlflow.db (default: ./tailtune_runs)")
    p.add_argument("--mlflow-uri", help="tracking URI instead, e.g. http://HOST:5000")
    p.add_argument("--output", help="write the Markdown here instead of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = build_parser().prog
    try:
        uri = resolve_tracking_uri(args.storage, args.mlflow_uri)
        text = render_report(load_trials(uri, args.experiment), args.experiment, uri)
    except LeaderboardError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if not args.output:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as exc:
        print(f"{prog}: error: cannot write --output {args.output!r}: {exc.strerror}; "
              "accepted: a writable file path", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["best_measured", "main", "method_key", "method_name", "render_report",
           "report_tables"]
