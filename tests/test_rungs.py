"""Successive halving per fused member (search.rungs): the verdicts of Ray Tune's ASHA."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.schedulers.trial_scheduler import TrialScheduler

from search.ledger import Ledger
from search.rungs import RungBook, cutoff_of
from search.scheduler import rung_epochs


def test_the_cutoff_by_hand() -> None:
    assert cutoff_of([], 2) is None
    assert cutoff_of([0.2, 0.4], 2) == pytest.approx(0.3)
    assert cutoff_of([0.1, 0.2, 0.3, 0.4], 4) == 0.325  # the 75th percentile, interpolated


def test_the_verdicts_are_those_of_tunes_asha(tmp_path: Path) -> None:
    """Twelve trials reporting in a random asynchronous order: every verdict equals the one
    Tune's own ASHA bracket gives (the bracket Ray builds for grace 1, max_t 16, rf 2)."""
    rng = random.Random(0)
    bracket = _Bracket(min_t=1, max_t=16, reduction_factor=2, s=0)
    book = RungBook(Ledger(tmp_path), rung_epochs(1, 16, 2), reduction_factor=2)
    assert sorted(milestone for milestone, _ in bracket._rungs) == sorted(book.rungs)
    epoch = {f"t{i}": 0 for i in range(12)}
    skill = {key: rng.random() for key in epoch}
    verdicts = 0
    while epoch:
        key = rng.choice(sorted(epoch))
        epoch[key] += 1
        value = skill[key] * epoch[key] / 16 + rng.gauss(0, 0.05)
        tune_stops = bracket.on_result(SimpleNamespace(trial_id=key), epoch[key],
                                       value) == TrialScheduler.STOP
        assert book.judge(key, epoch[key], value) == tune_stops, (key, epoch[key])
        verdicts += epoch[key] in book.rungs
        if tune_stops or epoch[key] == 16:
            del epoch[key]
    assert verdicts > 20  # the rungs were reached many times (25 here)


def test_a_verdict_is_final_and_shared_through_the_ledger(tmp_path: Path) -> None:
    book = RungBook(Ledger(tmp_path), rungs=(4,), reduction_factor=2)
    assert book.judge("a", 4, 0.8) is False  # first at the rung: goes on
    assert book.judge("b", 4, 0.5) is True  # below the median of [0.8]
    assert book.judge("b", 3, 0.1) is False  # not a rung
    # another process (a retried trial, a resumed sweep) reads the same records
    again = RungBook(Ledger(tmp_path), rungs=(4,), reduction_factor=2)
    assert again.judge("b", 4, 0.99) is True  # judged once: the verdict stands
    assert again.judge("c", 4, 0.9) is False  # above the median of [0.8, 0.5]
    assert Ledger(tmp_path).rung_values(4) == {"a": 0.8, "b": 0.5, "c": 0.9}
