"""The one loader interface every backend implements, and the registry that picks a backend.

A loader yields `(images, labels)`: images normalised, channels_last (when asked), in the autocast
dtype, on the training device; labels int64 on the device. `set_epoch(e)` (0-based) reshuffles from
the run's seed and applies the resolution schedule; under DDP each rank sees a disjoint share.
`set_epoch(e, start_batch=k)` starts the epoch at its batch k (a resume mid-epoch), on the loaders that
replay fastcd's crops (`replays_crops`).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.resolution import train_res
from fastcd.data.sharding import epoch_indices
from fastcd.errors import FastcdError

Split = Literal["train", "val"]


@dataclass(frozen=True)
class LoaderContext:
    """Where and how batches are delivered."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    num_classes: int = 1000
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    keep_last: bool = False  # training keeps its last, partial batch (the teacher cache writes every crop)


class BatchLoader(ABC):
    """An epoch-aware iterable of device batches."""

    num_classes: int
    num_samples: int  # samples this rank sees per epoch
    # True when a backend draws its training crops from `crops.CropPlan` and yields the samples of
    # `batch_indices()` in that order: a teacher cache can then replay what the teacher saw. Such a backend
    # also has `fingerprint()`, a digest of the data it reads (a cache must come from the same data).
    replays_crops: ClassVar[bool] = False
    # Where `replays_crops`: the name (in `RESAMPLING`) of how the backend resamples each crop box to res x res,
    # which a teacher cache's pixels depend on beside the boxes (`cache.identity`); None otherwise.
    resampling: str | None = None

    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on this rank."""

    @abstractmethod
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare epoch `epoch` (0-based): shuffle order and resolution; skip its first `start_batch` batches
        (only where `replays_crops`)."""

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images, labels) for the current epoch."""


class IndexedLoader(BatchLoader):
    """A backend that reads samples by index: the split's subset, batch size, epoch order (reshuffled,
    disjoint per rank; `sharding.epoch_indices`), resolution (`resolution.train_res`) and batch count
    (drop_last for training) are kept here, the same for every such backend."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext, size: int) -> None:
        self.cfg, self.split, self.ctx = cfg, split, ctx
        self.train = split == "train"
        limit = cfg.train_subset if self.train else cfg.val_subset
        self.size = min(limit, size) if limit else size
        self.batch_size = cfg.batch_size if self.train else (cfg.val_batch_size or cfg.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        c = self.ctx
        self.epoch = epoch
        order = epoch_indices(self.size, epoch=epoch, seed=c.seed, rank=c.rank, world_size=c.world_size,
                              train=self.train, batch_size=self.batch_size)
        self.order = order[start_batch * self.batch_size:]
        self.num_samples = len(self.order)
        self.res = train_res(self.cfg, epoch) if self.train else self.cfg.val_res

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.train and not self.ctx.keep_last else full + bool(rest)

    def batch_indices(self) -> list[Tensor]:
        """The sample indices of each batch of the current epoch."""
        return [self.order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]


LoaderFactory = Callable[[DataConfig, Split, LoaderContext], BatchLoader]
# Backend -> "module:factory", imported on first use, so a missing library breaks only its backend.
BACKENDS = {
    "imagefolder": "fastcd.data.imagefolder:imagefolder_loader",
    "fashion-mnist": "fastcd.data.fashion_mnist:fashion_mnist_loader",
    "synthetic": "fastcd.data.synthetic:synthetic_loader",
    "torch": "fastcd.data.shards_torch:shards_torch_loader",
    "ffcv": "fastcd.data.ffcv_loader:ffcv_loader",
    "dali": "fastcd.data.dali_loader:dali_loader",
}

# Backend -> whether its loader replays `crops.CropPlan`: its loader class's `replays_crops` (a test holds them
# to each other), known here without building a loader (`vs_original.choose`).
REPLAYS_CROPS = {"imagefolder": False, "fashion-mnist": True, "synthetic": True, "torch": True, "ffcv": True,
                 "dali": True}
REPLAYING = tuple(backend for backend, replays in REPLAYS_CROPS.items() if replays)
REPLAYING_NAMES = f"{', '.join(REPLAYING[:-1])} or {REPLAYING[-1]}"  # as a message names them

# How a loader that replays crops resamples a box to res x res, by name (`BatchLoader.resampling`). A teacher
# cache is shared by the loaders whose crop and resampling definitions agree; the JPEG decoder is not part of
# it (decoders differ by a few grey levels, which tests/test_crop_agreement.py bounds). Each definition reads
# only the box: near its edge a sample clamps to the box's edge pixels, as a crop then a resize does.
RESAMPLING = {
    "area": "area-averaged when shrinking, bilinear when enlarging (`transforms.resized_crops`: roi_align on an "
            "adaptive sampling grid over the box cut out; ffcv: OpenCV's INTER_AREA and `ffcv_crops.resample_box`)",
    "antialiased": "torchvision's antialiased bilinear: a triangle filter as wide as the scale when shrinking, "
                   "bilinear when enlarging (torchvision `resized_crop(antialias=True)`; DALI's `fn.resize`, "
                   "linear with antialias, its default)",
    "affine-bilinear": "bilinear sampling of an affine grid, no antialiasing (`transforms.resized_crop_affine`)",
}


def build_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """The loader of backend `cfg.backend` for `split`."""
    if cfg.backend not in BACKENDS:
        raise FastcdError(f"unknown data.backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")
    module, _, factory = BACKENDS[cfg.backend].partition(":")
    try:
        make: LoaderFactory = getattr(importlib.import_module(module), factory)
    except ImportError as e:
        raise FastcdError(f"data.backend {cfg.backend!r} cannot be used: its library failed to import ({e})") from e
    return make(cfg, split, ctx)
