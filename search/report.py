"""What the sweep prints before it starts and after it ends."""

from __future__ import annotations

from typing import Any

from search.options import resume_hint
from search.plan import TUNE_FOLDER, SweepPlan
from search.summary import best_line, leaderboard, rows_from_entries
from search.sweep import SweepOutcome


def header(plan: SweepPlan, resources: Any) -> str:
    o, d = plan.options, plan.dataset
    sizes = d.get("sizes", {})
    split = "/".join(str(sizes.get(s, "?")) for s in ("train", "val", "test"))
    imbalance = d["imbalance"]
    protocol = d["protocol"] + (" (selects on TEST: for comparison with papers only)"
                                if d["protocol"] == "paper" else "")
    if plan.rungs:
        stopping = (f"ASHA on val_all, rungs at epochs {', '.join(map(str, plan.rungs))} of "
                    f"{plan.total_epochs} (first {plan.rung_offset} epochs before the method "
                    f"acts are never judged)")
    else:
        stopping = f"no early stopping, {plan.total_epochs} epochs each"
    verb = "Resuming" if o.resume else "Sweep"
    return "\n".join([
        f"{verb} {o.name}: space {o.space} on {o.dataset}"
        + (f" [{d['source']}]" if d.get("source") else "") + f" (imbalance {imbalance}, protocol "
        f"{protocol}; train/val/test {split})",
        f"  {o.num_samples} trials, Optuna TPE seed {o.seed}; {stopping}",
        f"  {resources.max_concurrent} at a time, {resources.cpus:g} CPU + {resources.gpus:g} GPU "
        f"each" + (f", {resources.fuse} trials fused in each ({resources.cpus_for(fused=True):g} "
                   "CPU a fused one)" if resources.fuse > 1 else "")
        + (f"; time budget {o.time_budget:g} s" if o.time_budget else ""),
        f"  results: {plan.sweep_dir}",
        f"  MLflow: {plan.tracking_uri} (experiment {o.experiment!r})",
    ])


def final_report(plan: SweepPlan, outcome: SweepOutcome) -> str:
    o = plan.options
    protocol = plan.dataset["protocol"]
    lines = [f"Sweep {o.name} {outcome.status} in {outcome.wall_seconds:.1f} s", ""]
    if outcome.entries:
        rows = rows_from_entries(outcome.entries)
        lines += [leaderboard(rows, o.top, protocol), "", best_line(rows, protocol), ""]
    if outcome.reason:
        lines.append(f"Why it ended: {outcome.reason}")
    lines += [
        f"Trial ledger:  {plan.ledger.folder}",
        f"Tune results:  {plan.sweep_dir / TUNE_FOLDER}",
        f"Optuna study:  {o.name!r} in {plan.optuna_url}",
        f"MLflow:        {plan.tracking_uri}, experiment {o.experiment!r}, parent run "
        f"{outcome.parent_run_id}",
        f"               (browse: mlflow ui --backend-store-uri {plan.tracking_uri})",
    ]
    if outcome.status == "failed":  # last, where a user looks first
        lines.append(f"Sweep failed: {outcome.reason}")
    elif outcome.status != "completed":
        lines.append(f"Sweep {outcome.status}: {resume_hint(o)}")
    return "\n".join(lines)
