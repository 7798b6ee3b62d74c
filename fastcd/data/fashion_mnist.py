"""Fashion-MNIST from its idx files (Debian package dataset-fashion-mnist), held on the device."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, LoaderContext, Split
from fastcd.data.in_memory import InMemoryLoader
from fastcd.errors import FastcdError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                return f.read()
    raise FastcdError(f"idx file {str(path)!r}(.gz) does not exist; install the Debian package "
                      "dataset-fashion-mnist or set data.path to the folder holding the idx files")


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (optionally gzipped; `path` with or without `.gz`) as a numpy array."""
    data = _open(Path(str(path).removesuffix(".gz")))
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise FastcdError(f"{str(path)!r} is not an idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise FastcdError(f"idx file {str(path)!r} is truncated or padded: {len(data)} bytes, "
                          f"{expected} expected for shape {dims}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def load_split(folder: str | Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of a split: train = 60 000, val = the 10 000 test images."""
    images_name, labels_name = FILES[split]
    folder = Path(folder or FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise FastcdError(f"data.path {str(folder)!r} does not exist; Fashion-MNIST is in "
                          f"{FASHION_MNIST_DIR} once the Debian package dataset-fashion-mnist is installed")
    images, labels = read_idx(folder / images_name), read_idx(folder / labels_name)
    if len(images) != len(labels):
        raise FastcdError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def fashion_mnist_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """The idx files of `cfg.path` (first `train_subset`/`val_subset` samples if set), on the device."""
    images, labels = load_split(cfg.path, split)
    limit = cfg.train_subset if split == "train" else cfg.val_subset
    if limit:
        images, labels = images[:limit], labels[:limit]
    return InMemoryLoader(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                          cfg, split, ctx)
