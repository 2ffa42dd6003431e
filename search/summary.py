"""The end-of-sweep report: a leaderboard of the top trials and the best trial's test accuracy.

Rows come from the ledger (search.ledger), ranked in its one status order: completed trials by
final validation accuracy first; then trials stopped early, ranked by the accuracy they had when
stopped (not comparable with a finished trial's, hence below them); then trials an interrupted
sweep left unfinished; then diverged and failed ones. Test accuracy is reported, never used to
rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from search.ledger import ORDER, Entry, Status

GROUPS = ("all", "many", "medium", "few")


@dataclass
class TrialRow:
    trial_id: str
    status: Status
    epochs: int
    total_epochs: int
    val: dict[str, float | None]
    test: dict[str, float | None]
    params: dict[str, Any] = field(default_factory=dict)


def rows_from_entries(entries: Sequence[Entry]) -> list[TrialRow]:
    """TrialRows from the ledger's entries, ranked (see the module docstring)."""
    rows = []
    for entry in entries:
        metrics = entry.result
        rows.append(TrialRow(
            trial_id=entry.key,
            status=entry.status,
            epochs=int(metrics.get("epoch") or 0),
            total_epochs=int(metrics.get("total_epochs") or 0),
            val={g: metrics.get(f"val_{g}") for g in GROUPS},
            test={g: metrics.get(f"test_{g}") for g in GROUPS},
            params=dict(entry.params),
        ))
    return rank(rows)


def rank(rows: Sequence[TrialRow]) -> list[TrialRow]:
    def key(row: TrialRow) -> tuple[int, float]:
        val = row.val.get("all")
        return row.status.rank, -(val if isinstance(val, float) else -1.0)

    return sorted(rows, key=key)


def best_completed(rows: Sequence[TrialRow]) -> TrialRow | None:
    return next((row for row in rank(rows) if row.status is Status.COMPLETED), None)


def leaderboard(rows: Sequence[TrialRow], top: int, protocol: str) -> str:
    ranked = rank(rows)[:top]
    names = sorted({k for row in ranked for k in row.params}, key=_param_order(ranked))
    header = ["rank", "trial", "status", "epochs", "val_all", "val_many", "val_med", "val_few",
              *names]
    table = [header]
    for position, row in enumerate(ranked, 1):
        epochs = f"{row.epochs}/{row.total_epochs}" if row.total_epochs else "-"
        table.append([str(position), row.trial_id, row.status.value, epochs,
                      *(_pct(row.val[g]) for g in GROUPS),
                      *(_value(row.params.get(n)) for n in names)])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
             for line in table]
    label = "validation" if protocol == "holdout" else "TEST SET (paper protocol)"
    counts = ", ".join(f"{sum(r.status is s for r in rows)} {s.value}" for s in ORDER
                       if any(r.status is s for r in rows))
    title = (f"Leaderboard: top {len(ranked)} of {len(rows)} trials ({counts}), "
             f"ranked by {label} accuracy (%)")
    return "\n".join([title, *lines])


def best_line(rows: Sequence[TrialRow], protocol: str) -> str:
    best = best_completed(rows)
    if best is None:
        return "No trial completed: no best trial to test."
    note = "" if protocol == "holdout" else "  [paper protocol: selected on this test set]"
    test = ", ".join(f"{g} {_pct(best.test[g])}" for g in GROUPS)
    return f"Best trial {best.trial_id}: test accuracy (%) {test}{note}"


def _param_order(rows: Sequence[TrialRow]):
    order = {}
    for row in rows:
        for name in row.params:
            order.setdefault(name, len(order))
    return lambda name: order[name]


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) else "-"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
