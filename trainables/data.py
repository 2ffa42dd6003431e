"""Datasets: a registry of long-tailed benchmarks, each giving train / validation / test splits.

Every dataset is an `LTDataset`: training class counts (which define Many / Medium / Few), and a
`loader(split, ...)` that yields normalised float batches on the training device. In-memory
datasets (digits, CIFAR) keep uint8 images on the device (`trainables.loader`); list-file datasets
(ImageNet-LT, Places-LT, iNaturalist) decode files in DataLoader workers
(`trainables.datasets.listfile`).

A dataset registers its builder with `@register_dataset(name, scale=..., n_max=...,
default_model=...)` in a module of `trainables.datasets`; that package is imported on the first
lookup, so a new dataset is a new module there and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainables.models import MODELS
from trainables.registry import Registry, RegistryError, import_package

SPLITS = ("train", "val", "test")
PROTOCOLS = ("holdout", "paper")
SAMPLERS = ("instance", "class_balanced", "class_aware")
PROFILES = ("exp", "step", "natural")  # natural: an image folder's own class counts
# How big a dataset is, which picks each space's phase lengths and batch sizes
# (spaces.recipes): "tiny" (the embedded digits_lt, a sweep of minutes on a laptop CPU), "cifar"
# (the papers' CIFAR-LT recipes), "large" (ImageNet-LT, Places-LT, iNaturalist).
SCALES = ("tiny", "cifar", "large")


class DataError(ValueError):
    """Bad dataset input a user can fix (unknown name, bad value, missing files)."""


@dataclass
class ArraySplit:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class LTDataset:
    """A long-tailed benchmark with a balanced validation split disjoint from the test split.

    `protocol == "paper"` means validation *is* the test set (the official codebases select on
    test); every output built from such a dataset must say so.
    """

    name: str
    num_classes: int
    class_counts: list[int]
    protocol: str
    splits: dict[str, Any]  # split name -> ArraySplit or a list-file split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True
    image_size: int = 32
    default_model: str | None = None  # None: the registered dataset's default_model
    info: dict[str, Any] = field(default_factory=dict)
    # set by list-file datasets: builds a DataLoader-backed batch iterable
    make_loader: Callable[..., Iterable] | None = None
    _device_copies: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def in_memory(self) -> bool:
        return self.make_loader is None

    def on_device(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of an in-memory split on `device`, copied there once."""
        key = (split, str(device))
        if key not in self._device_copies:
            data = self.splits[split]
            self._device_copies[key] = (data.images.to(device), data.labels.to(device))
        return self._device_copies[key]

    def split_size(self, split: str) -> int:
        return len(self.splits[split])

    def labels(self, split: str) -> torch.Tensor:
        return self.splits[split].labels

    def loader(
        self,
        split: str,
        *,
        batch_size: int,
        device: torch.device,
        augment: bool = False,
        sampler: str = "instance",
        shuffle: bool = False,
        seed: int = 0,
        samples_per_class_draw: int = 4,
        num_workers: int = 4,
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (normalised float images, labels) on `device`; re-iterate for a new epoch."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        if sampler not in SAMPLERS:
            raise DataError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
        kwargs = dict(
            batch_size=batch_size,
            device=device,
            augment=augment,
            sampler=sampler,
            shuffle=shuffle,
            seed=seed,
            samples_per_class_draw=samples_per_class_draw,
        )
        if self.make_loader is not None:
            return self.make_loader(self, split, num_workers=num_workers, **kwargs)
        from trainables.loader import DeviceLoader

        return DeviceLoader(self, split, **kwargs)

    def describe(self) -> dict[str, Any]:
        sizes = {split: self.split_size(split) for split in SPLITS}
        return {
            "dataset": self.name,
            "protocol": self.protocol,
            "num_classes": self.num_classes,
            "sizes": sizes,
            **self.info,
        }


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its builder and what the rest of tailtune needs to know of it.

    `n_max`: training images of the head class before the long tail (the `count` radius is
    scaled by it); None where it depends on the data (an image folder's smallest class), and then
    the sweep passes the built dataset's own. `default_model` must be a registered model.
    `profiles`: the long-tail profiles it accepts (`natural` only where the data has its own).
    """

    name: str
    builder: Callable[..., LTDataset]
    scale: str
    n_max: int | None
    default_model: str
    protocols: tuple[str, ...] = PROTOCOLS
    profiles: tuple[str, ...] = ("exp", "step")


def _check_dataset(name: str, info: DatasetInfo) -> None:
    if info.scale not in SCALES:
        raise RegistryError(f"dataset {name!r} declares scale {info.scale!r}; accepted: "
                            f"{', '.join(SCALES)}")
    if info.n_max is not None and not (isinstance(info.n_max, int) and info.n_max >= 1):
        raise RegistryError(f"dataset {name!r} declares n_max {info.n_max!r}; accepted: an "
                            "integer >= 1, or None where it depends on the data")
    if info.default_model not in MODELS:
        raise RegistryError(f"dataset {name!r} declares default_model {info.default_model!r}; "
                            f"accepted: {', '.join(MODELS)}")
    for value, allowed, what in ((info.protocols, PROTOCOLS, "protocols"),
                                 (info.profiles, PROFILES, "profiles")):
        if not value or set(value) - set(allowed):
            raise RegistryError(f"dataset {name!r} declares {what} {value!r}; accepted: a "
                                f"non-empty subset of {', '.join(allowed)}")


DATASETS: Registry[DatasetInfo] = Registry(
    "dataset", DataError, discover=lambda: import_package("trainables.datasets"),
    check=_check_dataset,
)


def register_dataset(
    name: str,
    *,
    scale: str,
    n_max: int | None,
    default_model: str,
    protocols: tuple[str, ...] = PROTOCOLS,
    profiles: tuple[str, ...] = ("exp", "step"),
) -> Callable[[Callable[..., LTDataset]], Callable[..., LTDataset]]:
    """Decorator: register a builder `(**options) -> LTDataset` with its metadata."""

    def wrap(builder: Callable[..., LTDataset]) -> Callable[..., LTDataset]:
        DATASETS.register(name, DatasetInfo(name, builder, scale, n_max, default_model,
                                            tuple(protocols), tuple(profiles)))
        return builder

    return wrap


def dataset_names() -> list[str]:
    return DATASETS.names()


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)


def build_dataset(name: str, **options: Any) -> LTDataset:
    """Build a registered dataset. Options a dataset does not use are ignored when None."""
    info = DATASETS.get(name)
    protocol = options.get("protocol") or "holdout"
    if protocol not in info.protocols:
        raise DataError(f"unknown protocol {protocol!r}; accepted: {', '.join(info.protocols)}")
    imbalance = options.get("imbalance")
    if imbalance is not None and not float(imbalance) > 1:
        raise DataError(f"imbalance factor must be > 1, got {imbalance}")
    profile = options.get("profile") or "exp"
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r}; accepted: {', '.join(PROFILES)}")
    if profile == "natural" and profile not in info.profiles:
        raise DataError(f"profile natural keeps an image folder's own counts; {name} is "
                        "balanced or has its own long tail: accepted here: "
                        f"{', '.join(info.profiles)}")
    if profile not in info.profiles:
        raise DataError(f"profile {profile!r} is not one {name} offers; accepted: "
                        f"{', '.join(info.profiles)}")
    if profile == "natural" and imbalance is not None:
        raise DataError("profile natural keeps the folder's own counts; leave imbalance unset")
    dataset = info.builder(**{k: v for k, v in options.items() if v is not None})
    if dataset.default_model is None:  # the builder did not pick one for this data
        dataset.default_model = info.default_model
    return dataset
