"""Dataset-level fixed settings every space shares: batch sizes per size class of the data.

A space's phase lengths depend on how big the dataset is, not on which CIFAR it is, so every
dataset declares its scale when it registers (trainables.data.SCALES: "tiny", "cifar", "large")
and every space declares one plan per scale.
"""

from __future__ import annotations

from typing import Any

from spaces.core import SpaceError
from trainables.data import dataset_info

# Settings of the data pipeline, independent of the method (docs/methods.md 3 and 4).
SCALE_SETTINGS: dict[str, dict[str, Any]] = {
    # digits_lt: a one-epoch warm-up at batch 64 leaves stage 1 at ~57% val after 20 epochs;
    # five epochs at batch 128 reach ~90% (measured with the single-trial command).
    "tiny": {"batch_size": 128, "dro_batch_size": 128, "cls_batch_size": 128, "warmup_epochs": 5},
    "cifar": {"batch_size": 128, "dro_batch_size": 128, "cls_batch_size": 128, "warmup_epochs": 5},
    "large": {"batch_size": 256, "dro_batch_size": 256, "cls_batch_size": 256, "warmup_epochs": 5},
}


def dataset_scale(dataset: str) -> str:
    return dataset_info(dataset).scale


def count_reference(dataset: str) -> int:
    """Training images of the largest class (n_max of the LT construction). The `count` radius
    is eps_c = eps / sqrt(n_c); spaces sample the head class's radius and scale it by
    sqrt(n_max), so one eps range means the same thing for every radius variant
    (docs/methods.md 6). A dataset whose n_max depends on its data declares none: the sweep then
    passes the built dataset's own (search/plan.py), and without it this is an error."""
    n_max = dataset_info(dataset).n_max
    if n_max is None:
        raise SpaceError(f"the count radius needs the head-class size n_max, which {dataset} "
                         "takes from its data; accepted: n_max in the trial config (--n-max)")
    return n_max
