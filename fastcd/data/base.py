"""The one loader interface every backend implements, and the registry that picks a backend.

A loader yields `(images, labels)`: images normalised, channels_last (when asked), in the autocast
dtype, on the training device; labels int64 on the device. `set_epoch(e)` (0-based) reshuffles from
the run's seed and applies the resolution schedule; under DDP each rank sees a disjoint share.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fastcd.config import DataConfig
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


class BatchLoader(ABC):
    """An epoch-aware iterable of device batches."""

    num_classes: int
    num_samples: int  # samples this rank sees per epoch

    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on this rank."""

    @abstractmethod
    def set_epoch(self, epoch: int) -> None:
        """Prepare epoch `epoch` (0-based): shuffle order and resolution."""

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images, labels) for the current epoch."""


LoaderFactory = Callable[[DataConfig, Split, LoaderContext], BatchLoader]
LOADERS: dict[str, LoaderFactory] = {}
# Backend -> module that registers it (imported on first use, so a missing library breaks only its backend).
BACKEND_MODULES = {
    "imagefolder": "fastcd.data.imagefolder",
    "fashion-mnist": "fastcd.data.fashion_mnist",
    "synthetic": "fastcd.data.synthetic",
    "torch": "fastcd.data.shards_torch",
    "ffcv": "fastcd.data.ffcv_loader",
    "dali": "fastcd.data.dali_loader",
}


def register_loader(name: str) -> Callable[[LoaderFactory], LoaderFactory]:
    """Decorator adding a backend factory `(cfg, split, ctx) -> BatchLoader` under `name`."""

    def add(factory: LoaderFactory) -> LoaderFactory:
        LOADERS[name] = factory
        return factory

    return add


def build_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """The loader of backend `cfg.backend` for `split`."""
    if cfg.backend not in BACKEND_MODULES:
        raise FastcdError(f"unknown data.backend {cfg.backend!r}; choose from {', '.join(BACKEND_MODULES)}")
    try:
        importlib.import_module(BACKEND_MODULES[cfg.backend])
    except ImportError as e:
        raise FastcdError(f"data.backend {cfg.backend!r} cannot be used: its library failed to import ({e})") from e
    return LOADERS[cfg.backend](cfg, split, ctx)
