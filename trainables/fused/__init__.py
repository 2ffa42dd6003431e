"""Fused trials: K configurations of one shape trained as one model (issue 15).

    from trainables.fused import run_trials
    results = run_trials([config_a, config_b, config_c], on_epoch=None)

Mechanism: to be filled in after measurement.
"""

from trainables.fused.runner import FusedOnEpoch, FusedRunner, run_trials

__all__ = ["FusedOnEpoch", "FusedRunner", "run_trials"]
