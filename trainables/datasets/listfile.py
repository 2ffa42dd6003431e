"""ImageNet-LT, Places-LT and iNaturalist 2018 from their list files (docs/methods.md 1).

A release is an image root plus list files of `<relative path> <label>` lines. Images are decoded
with PIL in DataLoader workers (train: RandomResizedCrop + flip; eval: Resize + CenterCrop; both
normalised with the ImageNet mean / std) and each batch is moved to the training device.

Validation under the default "holdout" protocol:
- ImageNet-LT and Places-LT ship a balanced validation list drawn from the training images of the
  full dataset, disjoint from their test list: it is the validation split.
- iNaturalist 2018's official validation list is what the literature reports as its test set, so
  it is our test split, and validation is carved from the training list: per class,
  `val_per_class` images (default 1) chosen uniformly by `split_seed` leave training. Every class
  of the release has at least 2 training images, so every class keeps at least one. Class counts
  (Many / Medium / Few) are those of the remaining training images.
Under "paper", training is the full training list and validation is the test split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.data import DataError, LTDataset, register_dataset
from trainables.datasets.imagefolder import cache_dir, decode_images
from trainables.sampling import epoch_order

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # eval: resize the short side to 256, centre-crop 224 (and scaled)


@dataclass(frozen=True)
class Release:
    lists: dict[str, str]  # split -> default list-file name ("val" absent: carve from train)


RELEASES = {
    "imagenet_lt": Release(
        {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
         "test": "ImageNet_LT_test.txt"},
    ),
    "places_lt": Release(
        {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    ),
    "inat2018": Release(
        {"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"}
    ),
}


@dataclass
class ListSplit:
    """Image paths (relative to `root`) and their labels; images are decoded only when loaded."""

    root: Path
    paths: list[str]
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray) -> ListSplit:
        return ListSplit(self.root, [self.paths[i] for i in indices],
                         self.labels[torch.from_numpy(indices)])


def read_list_file(path: Path, root: Path) -> ListSplit:
    """Parse `<relative path> <label>` lines (paths may hold spaces; blank lines are skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise DataError(f"cannot read list file {path}: {reason}") from err
    paths, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(
                f"{path}:{number}: expected '<relative path> <label>', got {line.strip()!r}"
            )
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"list file {path} has no entries")
    return ListSplit(root, paths, torch.tensor(labels, dtype=torch.int64))


def carve_balanced(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `per_class` random images of every class to validation.

    Vectorised (one sort, not one pass per class) because iNaturalist has 8142 classes.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    short = present[counts[present] <= per_class]
    if len(short):
        raise DataError(
            f"class {short[0]} has {counts[short[0]]} training images; cannot give "
            f"{per_class} to validation and keep one (lower val_per_class)"
        )
    order = np.lexsort((rng.random(len(labels)), labels))  # by class, random within a class
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(labels)) - starts[labels[order]]
    to_val = rank < per_class
    return np.sort(order[~to_val]), np.sort(order[to_val])


def check_images(name: str, root: Path, splits: dict[str, tuple[Path, ListSplit]]) -> None:
    """Every listed image exists and decodes, or one DataError naming the first that does not.

    Decoding a whole release takes minutes, so a successful check leaves a stamp keyed by the
    lists' entries and every image's size and mtime; an unchanged release is checked in the
    time it takes to stat its files.
    """
    digest = hashlib.sha256()
    paths = []
    for list_path, split in splits.values():
        for number, rel in enumerate(split.paths, start=1):
            path = root / rel
            try:
                stat = path.stat()
            except OSError:
                stat = None
            if stat is None or not path.is_file():
                raise DataError(f"image {path} (entry {number} of {list_path}) not found; is "
                                f"{root} the image root the {name} lists are relative to?")
            digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            paths.append(str(path))
    stamp = cache_dir().parent / "verified" / digest.hexdigest()[:32]
    if stamp.is_file():
        return
    decode_images(paths, None, desc=f"checking {name} images", keep=False)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(f"{len(paths)} images of {root} decode\n")
    except OSError:  # the next run checks again; nothing is wrong with the data
        pass


def _resolve_list(explicit: str | None, data_dir: Path, default: str | None) -> Path | None:
    if explicit is not None:
        return Path(explicit).expanduser()
    return None if default is None else data_dir / default


def build_list_dataset(
    name: str,
    data_dir: str = "data",
    protocol: str = "holdout",
    split_seed: int = 0,
    image_size: int = 224,
    train_list: str | None = None,
    val_list: str | None = None,
    test_list: str | None = None,
    val_per_class: int = 1,
    num_classes: int | None = None,
    download: bool = False,
    imbalance: float | None = None,
    profile: str = "exp",
    **_: object,
) -> LTDataset:
    """Build a list-file dataset. `data_dir` is the image root and, unless a list is given
    explicitly (`train_list`, `val_list`, `test_list`), holds the list files too."""
    release = RELEASES[name]
    if download:
        raise DataError(f"{name} cannot be downloaded; get the images and list files and pass "
                        "--data-dir pointing at the image root")
    if imbalance is not None or profile != "exp":
        raise DataError(f"{name} has the imbalance of its list files; leave imbalance and "
                        "profile unset")
    if int(image_size) < 8:
        raise DataError(f"image_size must be >= 8, got {image_size}")
    if int(val_per_class) < 1:
        raise DataError(f"val_per_class must be >= 1, got {val_per_class}")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image root {root} for {name} is not a directory; pass --data-dir "
                        "pointing at the folder the list-file paths are relative to")
    explicit = {"train": train_list, "val": val_list, "test": test_list}
    wanted = ("train", "test") if protocol == "paper" else ("train", "val", "test")
    list_paths = {split: _resolve_list(explicit[split], root, release.lists.get(split))
                  for split in wanted}
    splits = {split: read_list_file(path, root)
              for split, path in list_paths.items() if path is not None}
    labels_seen = max(int(s.labels.max()) for s in splits.values()) + 1
    classes = int(num_classes) if num_classes is not None else labels_seen
    if classes < labels_seen:
        split, path = next((k, list_paths[k]) for k, v in splits.items()
                           if int(v.labels.max()) >= classes)
        raise DataError(f"{path}: label {int(splits[split].labels.max())} is outside the "
                        f"{classes} classes (0..{classes - 1}); accepted: labels below "
                        "num_classes")
    trained = torch.bincount(splits["train"].labels, minlength=classes) > 0
    for split in ("val", "test"):
        if split in splits and not bool(trained[splits[split].labels].all()):
            label = int(splits[split].labels[~trained[splits[split].labels]][0])
            raise DataError(f"{list_paths[split]}: class {label} has {split} images but no "
                            f"training image in {list_paths['train']}; accepted: {split} classes "
                            "that are training classes")
    check_images(name, root, {k: (list_paths[k], v) for k, v in splits.items()})

    train = splits["train"]
    if protocol == "paper":
        val_source = "test (paper protocol)"
        splits["val"] = splits["test"]
    elif "val" in splits:
        val_source = f"list {list_paths['val']}"
    else:
        train_idx, val_idx = carve_balanced(train.labels.numpy(), int(val_per_class), split_seed)
        splits["val"], train = train.subset(val_idx), train.subset(train_idx)
        splits["train"] = train
        val_source = f"{val_per_class} per class carved from train by split_seed {split_seed}"

    counts = torch.bincount(train.labels, minlength=classes).tolist()
    return LTDataset(
        name=name,
        num_classes=classes,
        class_counts=counts,
        protocol=protocol,
        splits=splits,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=0,
        flip=True,
        image_size=int(image_size),
        info={"image_root": str(root), "split_seed": split_seed, "val_source": val_source},
        make_loader=ListLoader,
    )


# n_max: the head class's training images in each release (docs/methods.md 1)
@register_dataset("imagenet_lt", scale="large", n_max=1280, default_model="resnext50")
def build_imagenet_lt(**options: object) -> LTDataset:
    return build_list_dataset("imagenet_lt", **options)


@register_dataset("places_lt", scale="large", n_max=4980, default_model="resnet50")
def build_places_lt(**options: object) -> LTDataset:
    return build_list_dataset("places_lt", **options)


@register_dataset("inat2018", scale="large", n_max=1000, default_model="resnet50")
def build_inat2018(**options: object) -> LTDataset:
    return build_list_dataset("inat2018", **options)


def transforms_for(image_size: int, augment: bool, mean: tuple[float, ...],
                   std: tuple[float, ...]):
    from torchvision import transforms

    if augment:
        head = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        head = [transforms.Resize(round(image_size * RESIZE_RATIO)),
                transforms.CenterCrop(image_size)]
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(mean, std)])


class ImageListDataset(torch.utils.data.Dataset):
    def __init__(self, split: ListSplit, transform) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.split.root / self.split.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from err
        return self.transform(rgb), int(self.split.labels[index])


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, loader: ListLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.num_samples

    def __iter__(self) -> Iterator[int]:
        loader = self.loader
        order = epoch_order(loader.split.labels, loader.sampler, loader.shuffle,
                            loader.samples_per_class_draw, loader.generator)
        return iter(order.tolist())


class ListLoader:
    """Batches of (normalised float images, labels) on `device`; each iteration is an epoch.

    The epoch order and the workers' augmentation seeds come from one CPU generator seeded with
    `seed` (its state can be saved and restored, as with DeviceLoader). With `num_workers=0` the
    augmentation draws from the process's global torch RNG instead.
    """

    def __init__(
        self,
        dataset: LTDataset,
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
    ) -> None:
        self.split = dataset.splits[split]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.sampler = sampler
        self.shuffle = shuffle or sampler != "instance"
        self.samples_per_class_draw = samples_per_class_draw
        self.labels = self.split.labels.to(self.device)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        transform = transforms_for(dataset.image_size, augment, dataset.mean, dataset.std)
        self._loader = torch.utils.data.DataLoader(
            ImageListDataset(self.split, transform),
            batch_size=batch_size,
            sampler=_EpochSampler(self),
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.generator,
        )

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))
