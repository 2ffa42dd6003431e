"""Datasets: a registry of long-tailed benchmarks, each giving train / validation / test splits.

Every dataset is an `LTDataset`: training class counts (which define Many / Medium / Few), and a
`loader(split, ...)` that yields normalised float batches on the training device. In-memory
datasets (digits, CIFAR) keep uint8 images on the device (`trainables.loader`); list-file datasets
(ImageNet-LT, Places-LT, iNaturalist) decode files in DataLoader workers (`trainables.listfile`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

SPLITS = ("train", "val", "test")
PROTOCOLS = ("holdout", "paper")
SAMPLERS = ("instance", "class_balanced", "class_aware")
PROFILES = ("exp", "step", "natural")  # natural: an image folder's own class counts


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
    default_model: str = "resnet32"
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


_REGISTRY: dict[str, Callable[..., LTDataset]] = {}


def register_dataset(name: str):
    def wrap(builder: Callable[..., LTDataset]) -> Callable[..., LTDataset]:
        _REGISTRY[name] = builder
        return builder

    return wrap


def dataset_names() -> list[str]:
    _import_builders()
    return sorted(_REGISTRY)


def build_dataset(name: str, **options: Any) -> LTDataset:
    """Build a registered dataset. Options a dataset does not use are ignored when None."""
    _import_builders()
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(sorted(_REGISTRY))}")
    protocol = options.get("protocol") or "holdout"
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; accepted: {', '.join(PROTOCOLS)}")
    imbalance = options.get("imbalance")
    if imbalance is not None and not float(imbalance) > 1:
        raise DataError(f"imbalance factor must be > 1, got {imbalance}")
    profile = options.get("profile") or "exp"
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r}; accepted: {', '.join(PROFILES)}")
    if profile == "natural" and name != "imagefolder":
        raise DataError(f"profile natural keeps an image folder's own counts; {name} is "
                        "balanced or has its own long tail: accepted here: exp, step")
    if profile == "natural" and imbalance is not None:
        raise DataError("profile natural keeps the folder's own counts; leave imbalance unset")
    return _REGISTRY[name](**{k: v for k, v in options.items() if v is not None})


def _import_builders() -> None:
    # Builders register themselves on import; imported lazily to keep `import trainables` light.
    import trainables.cifar  # noqa: F401
    import trainables.digits  # noqa: F401
    import trainables.fashion_mnist  # noqa: F401
    import trainables.imagefolder  # noqa: F401
    import trainables.listfile  # noqa: F401
