"""The `dali` backend: NVIDIA DALI decodes and augments the prepared webdataset shards.

On a GPU the JPEGs are decoded by the `mixed` decoder (the hardware JPEG decoder where the card has
one, `data.dali_hw_decoder_load`), resized, cropped, flipped and normalised to NHWC fp16/fp32 on
the GPU, and handed to PyTorch through DLPack as a channels_last NCHW view, without a copy. On a
CPU-only machine the same graph runs with CPU operators (`device_id=None`).

The samples are fed by index (the shards' index files give each JPEG's offset) in the order of
`sharding.epoch_indices`, so every backend shares one epoch order and DDP split. DALI's own
webdataset reader shuffles only within a buffer (~1000 samples), and the prepared shards are
sorted by class, so its batches would hold one or two classes.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split, register_loader
from fastcd.data.prepared import ShardSamples, open_prepared

RATIO = (3 / 4, 4 / 3)


class _FedPipeline(Pipeline):
    """A DALI pipeline whose `iter_setup` feeds the next batch of JPEGs (and resolution) by index."""

    def __init__(self, samples: ShardSamples, train: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.samples, self.train = samples, train
        self.batches: Iterator[np.ndarray] = iter(())
        self.res = 0

    def iter_setup(self) -> None:
        batch = next(self.batches)  # StopIteration ends DALI's epoch
        self.feed_input("jpegs", [self.samples.jpeg(i) for i in batch.tolist()])
        if self.train:
            self.feed_input("res", np.full(len(batch), self.res, dtype=np.float32))


def _build(cfg: DataConfig, ctx: LoaderContext, samples: ShardSamples, train: bool, batch_size: int) -> _FedPipeline:
    gpu = ctx.device.type == "cuda"
    pipe = _FedPipeline(samples, train, batch_size=batch_size, num_threads=max(1, cfg.workers),
                        device_id=(ctx.device.index or 0) if gpu else None, seed=ctx.seed * 1_009 + ctx.rank,
                        prefetch_queue_depth=cfg.dali_prefetch, exec_dynamic=True)
    decode = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:
        decode |= {"hw_decoder_load": cfg.dali_hw_decoder_load,
                   "preallocate_width_hint": cfg.dali_preallocate, "preallocate_height_hint": cfg.dali_preallocate}
    half = ctx.dtype in (torch.float16, torch.bfloat16)
    normalise = {"dtype": types.FLOAT16 if half else types.FLOAT, "output_layout": "HWC",
                 "mean": [255 * m for m in cfg.mean], "std": [255 * s for s in cfg.std]}
    with pipe:
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        if train:
            res = fn.external_source(name="res", dtype=types.FLOAT, ndim=0)
            images = fn.decoders.image_random_crop(jpegs, random_area=[cfg.scale_min, 1.0], random_aspect_ratio=RATIO,
                                                   num_attempts=10, **decode)
            images = fn.resize(images, resize_x=res, resize_y=res)
            images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5), **normalise)
        else:
            images = fn.decoders.image(jpegs, **decode)
            images = fn.resize(images, resize_shorter=round(cfg.val_res / cfg.val_resize_ratio))
            images = fn.crop_mirror_normalize(images, crop=(cfg.val_res, cfg.val_res), **normalise)
        pipe.set_outputs(images)
    pipe.build()
    return pipe


class DaliLoader(IndexedLoader):
    """Shards decoded and augmented by DALI, in `epoch_indices` order."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        prepared = open_prepared(cfg.path, split, ctx, "dali")
        self.samples = ShardSamples(prepared)
        super().__init__(cfg, split, ctx, len(self.samples))
        self.num_classes = len(prepared.classes)
        self.pipe = _build(cfg, ctx, self.samples, self.train, self.batch_size)
        self.set_epoch(0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = self.batch_indices()
        self.pipe.batches, self.pipe.res = iter(batches), self.res
        stream = torch.cuda.current_stream(self.ctx.device) if self.ctx.device.type == "cuda" else None
        try:
            for batch in batches:
                (images,) = self.pipe.run(stream)
                labels = torch.tensor([self.samples.label(i) for i in batch.tolist()], dtype=torch.int64)
                yield self._to_torch(images), labels.to(self.ctx.device, non_blocking=True)
        finally:
            self._finish_epoch()

    def _to_torch(self, images) -> Tensor:
        """NHWC DALI batch -> NCHW channels_last torch view of the same memory (cast if needed)."""
        x = torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.ctx.channels_last else torch.contiguous_format
        return x.to(dtype=self.ctx.dtype, memory_format=fmt)

    def _finish_epoch(self) -> None:
        """Consume what DALI still holds (the whole epoch was read, or the consumer stopped early)."""
        self.pipe.batches = iter(())
        while True:
            try:
                self.pipe.run()
            except StopIteration:
                break
        self.pipe.reset()


@register_loader("dali")
def dali_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """DALI over the prepared shards of `cfg.path`."""
    return DaliLoader(cfg, split, ctx)
