"""Fashion-MNIST-LT: the 28x28 grey Fashion-MNIST (Xiao et al., 2017) made long-tailed by the LDAM
construction (n_max 6,000, the images per class of the training set), held-out balanced
validation from the leftovers, the balanced 10,000-image test set.

The four IDX files (`{train,t10k}-{images-idx3,labels-idx1}-ubyte`, gzipped or not) are parsed
here, strictly: magic number, dimensions and payload length are checked against each other, so a
truncated or foreign file is one clear error. They are looked for in `--data-dir`, then in its
`FashionMNIST/raw/` (torchvision's download layout), then in the Debian package's
`/usr/share/datasets/fashion-mnist`; `--download` fetches them through torchvision.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from trainables.arrays import Arrays, lt_from_arrays
from trainables.data import DataError, LTDataset, register_dataset

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
N_MAX = 6000
UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `dims` dimensions (gzip is detected by its magic)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"cannot read {path}: broken gzip ({err})") from err
    if len(raw) < 4 + 4 * dims or raw[0:2] != b"\x00\x00" or raw[2] != UBYTE or raw[3] != dims:
        raise DataError(f"cannot read {path}: not an IDX file of {dims}-d unsigned bytes "
                        f"(header {raw[:4].hex()}, expected 0000{UBYTE:02x}{dims:02x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    payload = raw[4 + 4 * dims:]
    if len(payload) != int(np.prod(shape)):
        raise DataError(f"cannot read {path}: header says {'x'.join(map(str, shape))} = "
                        f"{int(np.prod(shape))} bytes, the file holds {len(payload)}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape).copy()  # writable


def find_files(data_dir: Path) -> dict[str, Path] | None:
    """The four files in the first folder that has all of them, gzipped or not."""
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw", SYSTEM_DIR):
        found = {}
        for key, stem in FILES.items():
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                break
            found[key] = path
        else:
            return found
    return None


def read_fashion_mnist(data_dir: Path, download: bool) -> tuple[Arrays, Path]:
    files = find_files(data_dir)
    if files is None and download:
        from torchvision import datasets

        data_dir.mkdir(parents=True, exist_ok=True)
        datasets.FashionMNIST(str(data_dir), train=True, download=True)
        files = find_files(data_dir)
    if files is None:
        raise DataError(
            f"Fashion-MNIST not found in {data_dir}, {data_dir / 'FashionMNIST' / 'raw'} or "
            f"{SYSTEM_DIR} (files {FILES['train_x']}[.gz] and the other three); accepted: "
            "--data-dir holding them, --download, or `apt-get install dataset-fashion-mnist`"
        )
    data = {key: read_idx(path, 3 if key.endswith("_x") else 1) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = data[f"{split}_x"], data[f"{split}_y"]
        if len(images) != len(labels):
            raise DataError(f"{files[f'{split}_x']} holds {len(images)} images but "
                            f"{files[f'{split}_y']} {len(labels)} labels; accepted: equal counts")
        if labels.size and labels.max() >= len(CLASSES):
            raise DataError(f"{files[f'{split}_y']}: label {int(labels.max())} is outside "
                            f"0..{len(CLASSES) - 1}")
    arrays = Arrays(
        np.ascontiguousarray(data["train_x"][:, None]), data["train_y"].astype(np.int64),
        np.ascontiguousarray(data["test_x"][:, None]), data["test_y"].astype(np.int64),
        len(CLASSES), list(CLASSES),
    )
    return arrays, files["train_x"].parent


@register_dataset("fashion_mnist_lt", scale="cifar", n_max=N_MAX, default_model="resnet32")
def build_fashion_mnist_lt(
    data_dir: str = "data",
    download: bool = False,
    imbalance: float = 100.0,
    profile: str = "exp",
    protocol: str = "holdout",
    split_seed: int = 0,
    n_max: int | None = None,
    val_per_class: int | None = None,
    **_: object,
) -> LTDataset:
    arrays, folder = read_fashion_mnist(Path(data_dir).expanduser().resolve(), download)
    return lt_from_arrays(
        "fashion_mnist_lt", arrays,
        n_max=N_MAX if n_max is None else int(n_max),
        imbalance=float(imbalance), profile=profile, protocol=protocol, split_seed=split_seed,
        val_per_class=val_per_class, crop_padding=4,
        info={"source": f"Fashion-MNIST (IDX files in {folder})"},
    )
