"""Generated stand-ins for the real benchmark files, written in the real formats.

`write_cifar_archive` writes the official CIFAR python archive layout (pickled batches), so the
real reader in `trainables.datasets.cifar` runs unchanged; `write_image_tree` writes real JPEG /
PNG files and `<relative path> <label>` list files named as the ImageNet-LT, Places-LT and
iNaturalist 2018 releases name them. Pixels are random (fixed seed): tests check sizes, splits
and plumbing, not accuracy.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR_LAYOUT = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": "test_batch",
        "train_per_class": 5000,
        "test_per_class": 1000,
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": "test",
        "train_per_class": 500,
        "test_per_class": 100,
    },
}

# list-file names and folder layout of each release; "val" is None where the release has none
LIST_LAYOUTS = {
    "imagenet_lt": {
        "lists": {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                  "test": "ImageNet_LT_test.txt"},
        # ImageNet-LT val is drawn from ImageNet train; its test from ImageNet val
        "folders": {"train": "train/{wnid}", "val": "train/{wnid}", "test": "val/{wnid}"},
        "ext": "JPEG",
    },
    "places_lt": {
        "lists": {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt",
                  "test": "Places_LT_test.txt"},
        "folders": {"train": "data_256/{letter}/{scene}", "val": "data_256/{letter}/{scene}",
                    "test": "val_256"},
        "ext": "jpg",
    },
    "inat2018": {
        "lists": {"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"},
        "folders": {"train": "train_val2018/Plantae/{label}",
                    "test": "train_val2018/Plantae/{label}"},
        "ext": "jpg",
    },
}


def write_cifar_archive(
    root: Path,
    num_classes: int,
    images_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the CIFAR-10 or CIFAR-100 python archive under `root`; return its folder.

    Defaults are the official sizes (CIFAR-10: 5000 train / 1000 test per class, five training
    batches; CIFAR-100: 500 / 100). Labels come in a shuffled order, as in the real files.
    """
    if num_classes not in CIFAR_LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    layout = CIFAR_LAYOUT[num_classes]
    per_class = images_per_class or layout["train_per_class"]
    per_class_test = test_per_class or layout["test_per_class"]
    rng = np.random.default_rng(seed)
    folder = Path(root) / layout["folder"]
    folder.mkdir(parents=True, exist_ok=True)

    train_labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), per_class_test))
    chunks = np.array_split(np.arange(len(train_labels)), len(layout["train"]))
    for name, chunk in zip(layout["train"], chunks, strict=True):
        _dump_batch(folder / name, train_labels[chunk], num_classes, rng, name)
    _dump_batch(folder / layout["test"], test_labels, num_classes, rng, layout["test"])

    if num_classes == 10:
        meta_name = "batches.meta"
        meta = {"label_names": [f"class_{i}" for i in range(10)],
                "num_cases_per_batch": len(chunks[0]), "num_vis": 3072}
    else:
        meta_name = "meta"
        meta = {"fine_label_names": [f"fine_{i}" for i in range(100)],
                "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    with open(folder / meta_name, "wb") as handle:
        pickle.dump(meta, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return folder


def _dump_batch(path: Path, labels: np.ndarray, num_classes: int, rng: np.random.Generator,
                name: str) -> None:
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    entry: dict[str, object] = {
        "batch_label": name,
        "data": data,
        "filenames": [f"img_{i:06d}.png" for i in range(len(labels))],
    }
    if num_classes == 10:
        entry["labels"] = labels.tolist()
    else:
        entry["fine_labels"] = labels.tolist()
        entry["coarse_labels"] = (labels // 5).tolist()
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=pickle.HIGHEST_PROTOCOL)


def write_image_tree(
    root: Path,
    class_counts: list[int],
    layout: str = "imagenet_lt",
    val_per_class: int = 2,
    test_per_class: int = 3,
    image_size: int = 16,
    image_format: str = "JPEG",
    seed: int = 0,
) -> dict[str, Path]:
    """Write images and list files of one release's layout under `root`.

    `class_counts[c]` training images for class c, plus `val_per_class` validation images (only
    for releases with a validation list) and `test_per_class` test images. Images are random RGB
    `image_size` squares (sides vary by a few pixels so resizing is exercised), encoded as
    `image_format` ("JPEG" or "PNG"). Returns the list file of each split ("train", "val",
    "test"; no "val" for iNaturalist 2018).
    """
    if layout not in LIST_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; accepted: {', '.join(LIST_LAYOUTS)}")
    from PIL import Image

    spec = LIST_LAYOUTS[layout]
    root = Path(root)
    rng = np.random.default_rng(seed)
    ext = spec["ext"] if image_format.upper() == "JPEG" else "png"
    sizes = {"train": class_counts,
             "val": [val_per_class] * len(class_counts),
             "test": [test_per_class] * len(class_counts)}
    lists: dict[str, Path] = {}
    for split, list_name in spec["lists"].items():
        lines = []
        for label, count in enumerate(sizes[split]):
            folder = spec["folders"][split].format(
                wnid=f"n{label:08d}", letter="abcdefghijklmnopqrstuvwxyz"[label % 26],
                scene=f"scene_{label}", label=label,
            )
            (root / folder).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                relative = f"{folder}/{split}_{label:04d}_{index:05d}.{ext}"
                side_h, side_w = image_size + rng.integers(0, 5, size=2)
                pixels = rng.integers(0, 256, size=(side_h, side_w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / relative, format=image_format.upper())
                lines.append(f"{relative} {label}")
        order = rng.permutation(len(lines))  # the releases do not group lines by class
        lists[split] = root / list_name
        lists[split].write_text("".join(lines[i] + "\n" for i in order))
    return lists


def write_folder_tree(
    root: Path,
    train_counts: list[int],
    test_per_class: int = 3,
    image_size: int = 16,
    class_names: list[str] | None = None,
    test_folder: str = "test",
    grey: bool = False,
    seed: int = 0,
) -> dict[str, list[Path]]:
    """Write `root/train/<class>/` and `root/<test_folder>/<class>/` image folders.

    Real image files: JPEG for even and PNG for odd classes, random pixels (grey when `grey`),
    class folders named `class_names` or `c0`, `c1`, ... Returns the files of each split.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = class_names or [f"c{i}" for i in range(len(train_counts))]
    written: dict[str, list[Path]] = {"train": [], test_folder: []}
    for split, counts in (("train", train_counts), (test_folder, [test_per_class] * len(names))):
        for label, (name, count) in enumerate(zip(names, counts, strict=True)):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            fmt, ext = ("JPEG", "jpg") if label % 2 == 0 else ("PNG", "png")
            for index in range(count):
                shape = (image_size, image_size) if grey else (image_size, image_size, 3)
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                path = folder / f"{index:04d}.{ext}"
                Image.fromarray(pixels).save(path, format=fmt)
                written[split].append(path)
    return written


def write_idx(path: Path, array: np.ndarray, gzipped: bool = True) -> Path:
    """An IDX file of unsigned bytes (the MNIST / Fashion-MNIST format)."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if gzipped else raw)
    return Path(path)
