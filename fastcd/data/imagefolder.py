"""The original data path: torchvision ImageFolder + PIL transforms in DataLoader workers.

The baseline every loader benchmark compares against. Pixels leave the workers as uint8 and are
normalised on the training device.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split
from fastcd.data.transforms import normalize
from fastcd.errors import FastcdError


class _EpochSampler(Sampler[int]):
    def __init__(self, indices: Tensor) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


def open_image_folder(root: Path) -> torchvision.datasets.ImageFolder:
    """An ImageFolder over `root`, with missing or empty folders reported as one-line errors."""
    if not root.is_dir():
        raise FastcdError(f"dataset folder {str(root)!r} does not exist")
    empty = sorted(p.name for p in root.iterdir() if p.is_dir() and not any(p.iterdir()))
    if empty:
        raise FastcdError(f"class folder {str(root / empty[0])!r} is empty ({len(empty)} empty class folders)")
    try:
        return torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise FastcdError(f"{str(root)!r} is not an ImageFolder tree (<class>/<image>): {e}") from None


class ImageFolderLoader(IndexedLoader):
    """ImageFolder + PIL RandomResizedCrop/flip (train) or Resize/CenterCrop (val) in workers."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        if not cfg.path:
            raise FastcdError("data.path is empty; set it to an ImageFolder tree (<path>/train/<class>/<image>, "
                              "<path>/val/...), or choose another data.backend")
        self.dataset = open_image_folder(Path(cfg.path) / split)
        super().__init__(cfg, split, ctx, len(self.dataset))
        self.num_classes = len(self.dataset.classes)
        if self.num_classes != ctx.num_classes:
            raise FastcdError(f"{cfg.path}/{split} has {self.num_classes} classes but the model has "
                              f"num_classes={ctx.num_classes}")
        self.set_epoch(0)

    def _transform(self, res: int) -> v2.Compose:
        if self.train:
            ops = [v2.RandomResizedCrop(res, scale=(self.cfg.scale_min, 1.0), antialias=True),
                   v2.RandomHorizontalFlip()]
        else:
            ops = [v2.Resize(round(res / self.cfg.val_resize_ratio), antialias=True), v2.CenterCrop(res)]
        return v2.Compose([v2.PILToTensor(), *ops])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.dataset.transform = self._transform(self.res)
        self.loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=_EpochSampler(self.order),
                                 num_workers=self.cfg.workers, pin_memory=self.ctx.device.type == "cuda",
                                 drop_last=self.train, persistent_workers=False,
                                 worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(
                                     self.ctx.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.ctx.device, non_blocking=True)
            yield (normalize(images, self.cfg.mean, self.cfg.std, self.ctx.dtype, self.ctx.channels_last),
                   labels.to(self.ctx.device, non_blocking=True))


def _seed_worker(worker_id: int) -> None:
    torch.manual_seed(torch.initial_seed() % 2**32 + worker_id)


def imagefolder_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """The original ImageFolder pipeline over `cfg.path/<split>`."""
    return ImageFolderLoader(cfg, split, ctx)
