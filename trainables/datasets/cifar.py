"""CIFAR-10-LT and CIFAR-100-LT (docs/methods.md 1), from the official python archives or, for
CIFAR-10, from a JPEG copy laid out as an image folder.

The archives are read directly through a restricted unpickler that admits only what those files
hold (dicts, lists, strings, bytes and numpy arrays of plain dtypes), so a crafted batch file
cannot run code; a generated archive in the same format works in tests. torchvision is used only
to download when the user passes `--download`.

`--data-dir` may instead hold CIFAR-10 as JPEG files, `train/<class>/*.jpg` and
`test/<class>/*.jpg` (directly or in a `cifar10-jpg/` folder): it is decoded once through the
image-folder cache, class indices follow CIFAR-10's official label order, and every output names
it "CIFAR-10 (JPEG q75 copy)": a lossy re-encoding, not the official pixels.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from trainables.arrays import Arrays, lt_from_arrays
from trainables.data import DataError, LTDataset, register_dataset
from trainables.datasets.imagefolder import check_image_size, load_folder, scan_folder

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
JPEG_SOURCE = "CIFAR-10 (JPEG q75 copy)"
JPEG_FOLDER = "cifar10-jpg"

ARCHIVES = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "n_max": 5000,
        "source": "CIFAR-10 (official python archive)",
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "n_max": 500,
        "source": "CIFAR-100 (official python archive)",
    },
}

# What the official batch files contain; anything else is refused before it is built.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # the official files (numpy 1, protocol 2)
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # numpy 2 at protocol 5 (generated test archives)
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArchiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's own signature
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR batch holds only dicts, lists, strings "
                "and numpy arrays"
            )
        return super().find_class(module, name)


def load_batch(path: Path) -> dict:
    """One CIFAR batch file, unpickled with only the types the official files use."""
    with open(path, "rb") as handle:
        entry = _ArchiveUnpickler(handle, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"expected a dict, found {type(entry).__name__}")
    return entry


def read_cifar_batches(
    folder: Path, files: list[str], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        entry = load_batch(folder / name)
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{name}: 'data' is {data.dtype} {data.shape}, expected uint8 "
                             "(N, 3072)")
        found = np.asarray(entry[label_key])
        if found.ndim != 1 or len(found) != len(data) or found.dtype.kind not in "iu":
            raise ValueError(f"{name}: {len(found)} labels for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(found.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def jpeg_root(data_dir: Path) -> Path | None:
    """The CIFAR-10 JPEG tree under `data_dir` (itself or its cifar10-jpg/), if there is one."""
    for root in (data_dir, data_dir / JPEG_FOLDER):
        if (root / "train" / CIFAR10_CLASSES[0]).is_dir():
            return root
    return None


def _ensure_archive(root: Path, num_classes: int, download: bool) -> Path:
    spec = ARCHIVES[num_classes]
    folder = root / spec["folder"]
    missing = [f for f in spec["train"] + spec["test"] if not (folder / f).is_file()]
    if missing and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        missing = [f for f in spec["train"] + spec["test"] if not (folder / f).is_file()]
    if missing:
        also = " or the CIFAR-10 JPEG tree (train/<class>/, test/<class>/)" if num_classes == 10 \
            else ""
        raise DataError(
            f"CIFAR-{num_classes} python archive not found in {folder} (missing {missing[0]}); "
            "pass --download to fetch it, or --data-dir pointing at the folder that holds "
            f"{spec['folder']}/{also}"
        )
    return folder


def _archive_arrays(root: Path, num_classes: int, download: bool) -> Arrays:
    spec = ARCHIVES[num_classes]
    folder = _ensure_archive(root, num_classes, download)
    try:
        train_x, train_y = read_cifar_batches(folder, spec["train"], spec["label_key"])
        test_x, test_y = read_cifar_batches(folder, spec["test"], spec["label_key"])
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError,
            AttributeError, TypeError, IndexError) as err:
        raise DataError(f"cannot read the CIFAR-{num_classes} archive in {folder}: {err}") from err
    for split, labels in (("training", train_y), ("test", test_y)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f"cannot read the CIFAR-{num_classes} archive in {folder}: a "
                            f"{split} label is {int(labels.max())}, outside 0..{num_classes - 1}")
    return Arrays(train_x, train_y, test_x, test_y, num_classes)


def _jpeg_arrays(root: Path, image_size: int | None) -> Arrays:
    scan = scan_folder(root)
    if scan.classes != CIFAR10_CLASSES:
        raise DataError(f"{root} looks like a CIFAR-10 JPEG tree but its classes are "
                        f"{', '.join(scan.classes)}; accepted: exactly "
                        f"{', '.join(CIFAR10_CLASSES)}")
    arrays = load_folder(scan, check_image_size(image_size))
    if arrays.train_x.shape[1:] != (3, 32, 32):
        raise DataError(f"{root}: images are {arrays.train_x.shape[1:]}, CIFAR-10 is 3x32x32")
    return arrays


def build_cifar_lt(
    num_classes: int,
    data_dir: str = "data",
    download: bool = False,
    imbalance: float = 100.0,
    profile: str = "exp",
    protocol: str = "holdout",
    split_seed: int = 0,
    n_max: int | None = None,
    val_per_class: int | None = None,
    image_size: int | None = None,
    **_: object,
) -> LTDataset:
    spec = ARCHIVES[num_classes]
    root = Path(data_dir).expanduser().resolve()
    tree = jpeg_root(root) if num_classes == 10 else None
    if tree is not None and not (root / spec["folder"]).is_dir():
        arrays, source = _jpeg_arrays(tree, image_size), JPEG_SOURCE
    else:
        arrays, source = _archive_arrays(root, num_classes, download), spec["source"]
    return lt_from_arrays(
        f"cifar{num_classes}_lt", arrays,
        n_max=spec["n_max"] if n_max is None else int(n_max),
        imbalance=float(imbalance), profile=profile, protocol=protocol, split_seed=split_seed,
        val_per_class=val_per_class, mean=CIFAR_MEAN, std=CIFAR_STD,
        info={"source": source},
    )


@register_dataset("cifar10_lt", scale="cifar", n_max=ARCHIVES[10]["n_max"],
                  default_model="resnet32")
def build_cifar10_lt(**options: object) -> LTDataset:
    return build_cifar_lt(10, **options)


@register_dataset("cifar100_lt", scale="cifar", n_max=ARCHIVES[100]["n_max"],
                  default_model="resnet32")
def build_cifar100_lt(**options: object) -> LTDataset:
    return build_cifar_lt(100, **options)
