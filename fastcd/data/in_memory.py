"""A loader over a uint8 image tensor held on the training device: batches are gathered, augmented
and normalised there, with no worker processes (Fashion-MNIST, synthetic data)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, LoaderContext, Split
from fastcd.data.resolution import train_res
from fastcd.data.sharding import epoch_indices
from fastcd.data.transforms import center_crop, normalize, random_resized_crop


class InMemoryLoader(BatchLoader):
    """Batches of `images` (N, C, H, W uint8; C = 1 is repeated to 3) and `labels` (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        self.cfg, self.split, self.ctx = cfg, split, ctx
        self.images = images.to(ctx.device)
        self.labels = labels.to(ctx.device, torch.int64)
        self.num_classes = ctx.num_classes
        self.train = split == "train"
        self.batch_size = cfg.batch_size if self.train else (cfg.val_batch_size or cfg.batch_size)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        c = self.ctx
        self.order = epoch_indices(len(self.images), epoch=epoch, seed=c.seed, rank=c.rank,
                                   world_size=c.world_size, train=self.train).to(self.ctx.device)
        self.num_samples = len(self.order)
        self.res = train_res(self.cfg, epoch) if self.train else self.cfg.val_res

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.train else full + bool(rest)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.ctx.seed * 7_919 + self.epoch * 31 + self.ctx.rank)
        for b in range(len(self)):
            idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float()
            if self.train:
                x = random_resized_crop(x, self.res, g, scale=(self.cfg.scale_min, 1.0))
            else:
                x = center_crop(x, self.res, self.cfg.val_resize_ratio)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            yield (normalize(x, self.cfg.mean, self.cfg.std, self.ctx.dtype, self.ctx.channels_last),
                   self.labels[idx])
