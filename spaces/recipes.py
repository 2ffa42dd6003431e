"""Dataset-level fixed settings every space shares: batch sizes and the size class of the data.

A space's phase lengths depend on how big the dataset is, not on which CIFAR it is, so datasets
map to a scale ("tiny": the embedded digits_lt, sized for a sweep of minutes on a laptop CPU;
"cifar": the papers' CIFAR-LT recipes; "large": ImageNet-LT, Places-LT, iNaturalist) and every
space declares one plan per scale. A dataset registered later without an entry here gets the
"cifar" recipe.
"""

from __future__ import annotations

from typing import Any

SCALES = ("tiny", "cifar", "large")

DATASET_SCALE = {
    "digits_lt": "tiny",
    "cifar10_lt": "cifar",
    "cifar100_lt": "cifar",
    "fashion_mnist_lt": "cifar",
    "imagefolder": "cifar",
    "imagenet_lt": "large",
    "places_lt": "large",
    "inat2018": "large",
}

# Settings of the data pipeline, independent of the method (docs/methods.md 3 and 4).
SCALE_SETTINGS: dict[str, dict[str, Any]] = {
    # digits_lt: a one-epoch warm-up at batch 64 leaves stage 1 at ~57% val after 20 epochs;
    # five epochs at batch 128 reach ~90% (measured with the single-trial command).
    "tiny": {"batch_size": 128, "dro_batch_size": 128, "cls_batch_size": 128, "warmup_epochs": 5},
    "cifar": {"batch_size": 128, "dro_batch_size": 128, "cls_batch_size": 128, "warmup_epochs": 5},
    "large": {"batch_size": 256, "dro_batch_size": 256, "cls_batch_size": 256, "warmup_epochs": 5},
}

# Training images of the largest class (n_max of the LT construction). The `count` radius is
# eps_c = eps / sqrt(n_c); spaces sample the head class's radius and scale it by sqrt(n_max) so
# one eps range means the same thing for every radius variant (docs/methods.md 6).
COUNT_REFERENCE = {
    "digits_lt": 110,
    "cifar10_lt": 5000,
    "cifar100_lt": 500,
    "fashion_mnist_lt": 6000,
    "imagenet_lt": 1280,
    "places_lt": 4980,
    "inat2018": 1000,
}


def dataset_scale(dataset: str) -> str:
    return DATASET_SCALE.get(dataset, "cifar")


def count_reference(dataset: str) -> int:
    return COUNT_REFERENCE.get(dataset, 500)
