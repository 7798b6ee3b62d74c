"""The `torch` backend: the prepared shards read by index, decoded with `torchvision.io.decode_jpeg`.

A `DataLoader` over the samples in `epoch_indices` order. On a CPU device the workers decode and
crop (uint8 out); on CUDA the workers only read JPEG bytes and the batch is decoded on the GPU in
one `decode_jpeg` call, then cropped there. Each sample's crop and flip come from a generator seeded
by (seed, epoch, sample), so they do not depend on the worker count or on where the crop runs.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split, register_loader
from fastcd.data.prepared import ShardSamples, open_prepared
from fastcd.data.transforms import crop_boxes, normalize

RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Augment:
    """RandomResizedCrop + flip (train) or resize + centre crop (val) of one decoded uint8 CHW image."""

    train: bool
    res: int
    scale_min: float
    resize_ratio: float
    seed: int
    epoch: int

    def __call__(self, image: Tensor, index: int) -> Tensor:
        if not self.train:
            image = TF.resize(image, round(self.res / self.resize_ratio), antialias=True)
            return TF.center_crop(image, [self.res, self.res])
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
        x0, y0, w, h = crop_boxes(1, image.shape[-2], image.shape[-1], (self.scale_min, 1.0), RATIO, g)[0].tolist()
        image = TF.resized_crop(image, int(y0), int(x0), int(h), int(w), [self.res, self.res], antialias=True)
        return image.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else image


class _Shards(Dataset):
    """Sample i -> (augmented uint8 image, label), or (JPEG bytes, label) when decoding on the GPU."""

    def __init__(self, samples: ShardSamples, augment: Augment | None) -> None:
        self.samples, self.augment = samples, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        data = torch.from_numpy(self.samples.jpeg(i).copy())
        if self.augment is not None:
            data = self.augment(decode_jpeg(data, mode=ImageReadMode.RGB), i)
        return data, self.samples.label(i), i


def _collate_bytes(items: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, list[int]]:
    data, labels, indices = zip(*items)
    return list(data), torch.tensor(labels), list(indices)


class ShardsTorchLoader(IndexedLoader):
    """Shards -> torchvision decode (workers on CPU, batched on the GPU) -> device batches."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        prepared = open_prepared(cfg.path, split, ctx, "dali")
        self.samples = ShardSamples(prepared)
        super().__init__(cfg, split, ctx, len(self.samples))
        self.num_classes = len(prepared.classes)
        self.gpu_decode = ctx.device.type == "cuda"
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        c, cfg = self.ctx, self.cfg
        self.augment = Augment(self.train, self.res, cfg.scale_min, cfg.val_resize_ratio, c.seed, epoch)
        dataset = _Shards(self.samples, None if self.gpu_decode else self.augment)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.order.tolist(),
                                 num_workers=cfg.workers, drop_last=self.train, pin_memory=self.gpu_decode,
                                 collate_fn=_collate_bytes if self.gpu_decode else None)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        c = self.cfg
        for data, labels, indices in self.loader:
            if self.gpu_decode:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.ctx.device)
                data = torch.stack([self.augment(image, i) for image, i in zip(decoded, indices)])
            images = data.to(self.ctx.device, non_blocking=True)
            yield (normalize(images, c.mean, c.std, self.ctx.dtype, self.ctx.channels_last),
                   labels.to(self.ctx.device, non_blocking=True))


@register_loader("torch")
def shards_torch_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """torchvision decoding of the prepared shards of `cfg.path`."""
    return ShardsTorchLoader(cfg, split, ctx)
