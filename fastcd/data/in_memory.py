"""A loader over a uint8 image tensor held on the training device: batches are gathered, augmented
and normalised there, with no worker processes (Fashion-MNIST, synthetic data)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.base import IndexedLoader, LoaderContext, Split
from fastcd.data.crops import CropPlan
from fastcd.data.transforms import normalize, resized_crop_affine


class InMemoryLoader(IndexedLoader):
    """Batches of `images` (N, C, H, W uint8; C = 1 is repeated to 3) and `labels` (N,)."""

    replays_crops = True
    resampling = "affine-bilinear"

    def __init__(self, images: Tensor, labels: Tensor, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        super().__init__(cfg, split, ctx, len(images))
        self.images = images.to(ctx.device)
        self.labels = labels.to(ctx.device, torch.int64)
        self.num_classes = ctx.num_classes
        self.set_epoch(0)

    def fingerprint(self) -> str:
        """sha256 of the images and labels (in sample order)."""
        digest = hashlib.sha256()
        for tensor in (self.images, self.labels):
            digest.update(tensor.cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.device_order = self.order.to(self.ctx.device)  # one copy per epoch; crops are drawn on the host

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        c = self.cfg
        plan = CropPlan(self.train, self.res, c.scale_min, c.val_resize_ratio, self.ctx.seed, self.epoch)
        _, _, height, width = self.images.shape
        for b, host_idx in enumerate(self.batch_indices()):
            idx = self.device_order[b * self.batch_size:b * self.batch_size + len(host_idx)]
            size = torch.full((len(host_idx),), height), torch.full((len(host_idx),), width)
            x = resized_crop_affine(self.images[idx].float(), plan.boxes(host_idx, *size), self.res)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            yield (normalize(x, self.cfg.mean, self.cfg.std, self.ctx.dtype, self.ctx.channels_last),
                   self.labels[idx])
