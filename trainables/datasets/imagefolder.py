"""Any folder of images as a long-tailed benchmark, decoded once into a cached uint8 array.

Layout: `ROOT/train/<class>/<image>` and `ROOT/test/<class>/<image>` (or `ROOT/val/...`), class
indices in sorted folder-name order. Every file in a class folder is an image (hidden files
aside): one that does not decode is an error naming it, wherever it is.

Decoding runs in worker processes with a progress bar, once: the arrays are saved under the
cache folder (`TAILTUNE_CACHE_DIR`, default `~/.cache/tailtune/decoded`) keyed by the folder's
content (every file's relative path, size and mtime) and the decode size, and read back as plain
`.npy` arrays (never unpickled; a cache file that does not parse is decoded again). Trials of a
sweep that build the same folder at once wait on a file lock: one decodes, the others read.

The long-tailed split, holdout and Many / Medium / Few come from `trainables.arrays`, exactly as
for CIFAR: the training set is made long-tailed by the LDAM construction (`--imbalance`,
`--profile`, `--n-max`, default the smallest class's image count) unless `--profile natural`
keeps the folder's own counts.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, UnidentifiedImageError

from trainables.arrays import Arrays, lt_from_arrays
from trainables.data import PROFILES, DataError, LTDataset, register_dataset

CACHE_ENV = "TAILTUNE_CACHE_DIR"
CACHE_FORMAT = 1  # bump when the decoded layout changes: old entries are simply not found
TEST_FOLDERS = ("test", "val")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
CHUNK = 256  # images per worker task: large enough to hide the task overhead
PARALLEL_FROM = 2000  # below this many images a worker pool costs more than it saves


@dataclass(frozen=True)
class FolderScan:
    """What is in an image folder, in label order, and the fingerprint of its content."""

    root: Path
    test_folder: str
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path relative to root, label)
    test: tuple[tuple[str, int], ...]
    fingerprint: str


def scan_folder(root: Path) -> FolderScan:
    """List an image folder; raise DataError on a layout it cannot use."""
    layout = ("accepted: a folder with train/<class>/ and test/<class>/ (or val/<class>/) "
              "image folders")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory; {layout}")
    if not (root / "train").is_dir():
        raise DataError(f"image folder {root} has no train/ folder; {layout}")
    test_folder = next((name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if test_folder is None:
        raise DataError(f"image folder {root} has no test/ or val/ folder; {layout}")
    classes = tuple(_class_folders(root / "train"))
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} holds {len(classes)} class folder(s); {layout}, "
                        "with at least 2 classes")
    test_classes = _class_folders(root / test_folder)
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise DataError(f"class {extra[0]!r} is in {root / test_folder} but not in "
                        f"{root / 'train'}; accepted: test classes that are training classes")
    digest = hashlib.sha256()
    listed: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", test_folder):
        entries = []
        for label, name in enumerate(classes):
            folder = root / split / name
            files = _image_files(folder) if folder.is_dir() else []
            if not files:
                raise DataError(f"{folder} holds no images; accepted: every class has images in "
                                f"train/ and {test_folder}/")
            for entry in files:
                stat = entry.stat()
                rel = f"{split}/{name}/{entry.name}"
                digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
                entries.append((rel, label))
        listed[split] = entries
    return FolderScan(root, test_folder, classes, tuple(listed["train"]),
                      tuple(listed[test_folder]), digest.hexdigest())


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[os.DirEntry]:
    entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    return sorted(entries, key=lambda e: e.name)


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tailtune"
    return Path(base).expanduser() / "decoded"


def load_folder(scan: FolderScan, image_size: int | None) -> Arrays:
    """The folder's images as arrays: from the decode cache, or decoded (once) and cached."""
    key = hashlib.sha256(f"{CACHE_FORMAT}\n{image_size}\n{scan.fingerprint}".encode()).hexdigest()
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the decode cache {folder}: {err.strerror}; accepted: "
                        f"{CACHE_ENV} set to a folder this user can write") from err
    path = folder / f"{key[:32]}.npz"
    with FileLock(str(path) + ".lock"):
        arrays = _read_cache(path, scan)
        if arrays is None:
            arrays = _decode(scan, image_size)
            _write_cache(path, arrays)
    return arrays


def _read_cache(path: Path, scan: FolderScan) -> Arrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = Arrays(stored["train_x"], stored["train_y"], stored["test_x"],
                            stored["test_y"], len(scan.classes), list(scan.classes))
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable or foreign: decode again and overwrite it
    fits = (arrays.train_x.dtype == np.uint8 and arrays.train_x.ndim == 4
            and len(arrays.train_x) == len(arrays.train_y) == len(scan.train)
            and len(arrays.test_x) == len(arrays.test_y) == len(scan.test)
            and arrays.test_x.shape[1:] == arrays.train_x.shape[1:])
    return arrays if fits else None


def _write_cache(path: Path, arrays: Arrays) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, train_x=arrays.train_x, train_y=arrays.train_y, test_x=arrays.test_x,
                 test_y=arrays.test_y)
        os.replace(tmp, path)  # atomic: a reader never sees half an array
    except OSError as err:  # a full or read-only disk costs the next run a decode, nothing more
        print(f"warning: could not write the decode cache {path}: {err}", file=sys.stderr)
        tmp.unlink(missing_ok=True)


def _decode(scan: FolderScan, image_size: int | None) -> Arrays:
    entries = scan.train + scan.test
    paths = [str(scan.root / rel) for rel, _ in entries]
    images, grey = decode_images(paths, image_size, desc=f"decoding {scan.root}")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        first = images[0].shape
        odd = next(i for i, image in enumerate(images) if image.shape != first)
        raise DataError(
            f"images in {scan.root} differ in size ({entries[0][0]} is "
            f"{first[1]}x{first[0]}, {entries[odd][0]} is {images[odd].shape[1]}x"
            f"{images[odd].shape[0]}); accepted: --image-size N to resize each image on decode"
        )
    stacked = np.stack(images).transpose(0, 3, 1, 2)  # N, C, H, W
    if grey:
        stacked = stacked[:, :1]
    stacked = np.ascontiguousarray(stacked)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    n = len(scan.train)
    return Arrays(stacked[:n], labels[:n], stacked[n:], labels[n:], len(scan.classes),
                  list(scan.classes))


def decode_images(paths: Sequence[str], image_size: int | None, desc: str = "decoding",
                  keep: bool = True) -> tuple[list[np.ndarray], bool]:
    """Decode every image (RGB, HxWx3 uint8), in worker processes when there are many.

    Returns the images (none when `keep` is false: a check that every file decodes) and whether
    all of them were grey; raises DataError naming the first file that does not decode.
    """
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    tasks = [(chunk, image_size, keep) for chunk in chunks]
    images: list[np.ndarray] = []
    all_grey = True
    bar = Progress(desc, len(paths), enabled=len(paths) >= PARALLEL_FROM)
    workers = min(len(chunks), os.cpu_count() or 1)
    pool = None
    if len(paths) < PARALLEL_FROM or workers < 2:
        results = map(_decode_chunk, tasks)
    else:
        # forkserver: the workers need PIL and numpy only, and a fork of a process running
        # torch's thread pools can deadlock
        pool = ProcessPoolExecutor(workers, mp_context=get_context("forkserver"))
        results = pool.map(_decode_chunk, tasks)
    try:
        for decoded, count, grey, error in results:
            if error is not None:
                raise DataError(error)
            images.extend(decoded)
            all_grey = all_grey and grey
            bar.update(count)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return images, all_grey


def _decode_chunk(task: tuple[Sequence[str], int | None, bool]
                  ) -> tuple[list[np.ndarray], int, bool, str | None]:
    paths, image_size, keep = task
    out, grey = [], True
    for path in paths:
        try:
            with Image.open(path) as image:
                grey = grey and image.mode in GREY_MODES
                rgb = image.convert("RGB")  # decodes the whole file: truncation shows here
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                Image.DecompressionBombError) as err:
            return out, len(out), grey, (f"cannot decode image {path}: {err}; accepted: image "
                                         "files only")
        if keep:
            if image_size is not None:
                rgb = _resize(rgb, image_size)
            out.append(np.asarray(rgb, dtype=np.uint8))
    return out, len(paths), grey, None


class Progress:
    """A one-line progress bar on stderr, redrawn at most once a second (no dependency: the GPU
    machine's image has PyTorch and numpy, not tqdm)."""

    def __init__(self, desc: str, total: int, enabled: bool = True) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled
        self.done, self.start, self.drawn = 0, time.perf_counter(), 0.0

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self.drawn >= 1.0 or self.done == self.total):
            self.drawn = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"\r{self.desc}: {self.done:,} / {self.total:,} images ({rate:,.0f}/s)",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            print(file=sys.stderr, flush=True)


def _resize(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (antialiased), then the centre `size` x `size` crop."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def check_image_size(image_size: int | None) -> int | None:
    if image_size is not None and not (isinstance(image_size, int) and 8 <= image_size <= 1024):
        raise DataError(f"image_size must be an integer in [8, 1024]; got {image_size!r}")
    return image_size


@register_dataset("imagefolder", scale="cifar", n_max=None, default_model="resnet32",
                  profiles=PROFILES)
def build_imagefolder(
    data_dir: str = "data",
    imbalance: float = 100.0,
    profile: str = "exp",
    protocol: str = "holdout",
    split_seed: int = 0,
    n_max: int | None = None,
    val_per_class: int | None = None,
    image_size: int | None = None,
    download: bool = False,
    **_: object,
) -> LTDataset:
    if download:
        raise DataError("imagefolder cannot be downloaded; accepted: --data-dir pointing at a "
                        "folder with train/<class>/ and test/<class>/")
    root = Path(data_dir).expanduser().resolve()
    scan = scan_folder(root)
    arrays = load_folder(scan, check_image_size(image_size))
    available = np.bincount(arrays.train_y, minlength=arrays.num_classes)
    size = arrays.train_x.shape[-1]
    if profile == "natural":
        # the folder's own counts; validation comes out of them, so even the smallest class
        # keeps three quarters of its images by default
        n_max, imbalance = int(available.max()), float(available.max() / available.min())
        if val_per_class is None:
            val_per_class = max(1, int(available.min()) // 4)
    elif n_max is None:
        n_max = int(available.min())
    return lt_from_arrays(
        "imagefolder", arrays,
        n_max=int(n_max), imbalance=float(imbalance), profile=profile, protocol=protocol,
        split_seed=split_seed, val_per_class=val_per_class, crop_padding=max(1, size // 8),
        # the registered resnet32 is a CIFAR-sized network; larger images take an ImageNet one
        default_model=None if size <= 64 else "resnet50",
        info={"source": f"image folder {root}", "classes": list(scan.classes)},
    )
