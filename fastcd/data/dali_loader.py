"""The `dali` backend: NVIDIA DALI decodes and augments the prepared webdataset shards.

On a GPU the JPEGs are decoded by the `mixed` decoder (the hardware JPEG decoder where the card has
one, `data.dali_hw_decoder_load`), resized, cropped, flipped and normalised on the GPU; the labels
are copied to the GPU by DALI too. Both reach PyTorch through DLPack as views of DALI's own buffers,
already in the run's layout and, for fp32 and fp16, in its dtype: no copy. DALI has no bfloat16; for
bf16 it writes fp32 and one `.to(bfloat16)` rounds that (the cheapest correct way measured, see
docs/loaders.md). On a CPU-only machine the same graph runs with CPU operators (`device_id=None`).

The samples are fed by index (the shards' index files give each JPEG's offset) in the order of
`sharding.epoch_indices`, so every backend shares one exact, full per-epoch shuffle and DDP split; each
sample's crop window and flip are fed too (train and val), computed by `crops.CropPlan` from the sizes in
the split's sample table for the whole epoch before DALI runs it (torch's threads, computing them per batch
beside DALI's, cost 13% on two cores), so DALI executes the crops every backend executes (a teacher cache
replays).
DALI's own webdataset reader shuffles only within a buffer (~1000 samples), and the prepared shards
are sorted by class, so its batches would hold one or two classes. The JPEG bytes are fed as views of
the memory-mapped shards (`no_copy`), so the main thread does not copy them.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, LoaderContext, Split
from fastcd.data.crops import CropPlan
from fastcd.data.prepared import ShardLoader, ShardSamples

# What crop_mirror_normalize writes for each run dtype (no bfloat16 in DALI: fp32, rounded once by torch).
DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}
WINDOW_CHUNK = 65_536  # samples per CropPlan call when an epoch's windows are computed (bounds its memory)


class _FedPipeline(Pipeline):
    """A DALI pipeline whose `iter_setup` feeds the next batch by index: JPEG bytes (views of the mapped
    shards), labels, the epoch's resolution and each sample's crop window and flip, sliced from the
    windows `start` computed for the whole epoch."""

    def __init__(self, samples: ShardSamples, **kwargs) -> None:
        super().__init__(**kwargs)
        self.samples = samples
        self.batches: Iterator[Tensor] = iter(())
        self.windows: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]] = iter(())
        self.res = np.float32(0)

    def start(self, batches: list[Tensor], plan: CropPlan) -> None:
        """Feed `batches` next, cropped by `plan`. Their windows are computed here, while DALI is idle, not
        per batch in `iter_setup`: CropPlan's torch ops run on torch's intra-op threads, which then spin on
        the cores DALI's threads are decoding on (13% of the throughput on two cores, docs/loaders.md)."""
        self.windows = iter(_windows(self.samples, batches, plan))
        self.batches, self.res = iter(batches), np.float32(plan.res)

    def iter_setup(self) -> None:
        batch = next(self.batches)  # StopIteration ends DALI's epoch
        anchor, shape, flip = next(self.windows)
        s, idx = self.samples, batch.numpy()
        self.feed_input("jpegs", [s.jpeg(i) for i in idx.tolist()])
        self.feed_input("labels", s.labels[idx])
        self.feed_input("anchor", anchor)  # x0, y0 ("WH" order)
        self.feed_input("shape", shape)  # w, h
        self.feed_input("flip", flip)
        self.feed_input("res", np.full(len(idx), self.res))


def _windows(samples: ShardSamples, batches: list[Tensor], plan: CropPlan) -> list[tuple[np.ndarray, ...]]:
    """Each batch's crop windows as DALI reads them: anchors (x0, y0) and shapes (w, h), (B, 2) float32, and
    flips, (B,) int32; `plan`'s boxes, computed WINDOW_CHUNK samples per call."""
    if not batches:
        return []
    order = torch.cat(batches)
    idx = order.numpy()
    boxes = torch.cat([plan.boxes(order[c:c + WINDOW_CHUNK], torch.from_numpy(samples.heights[idx[c:c + WINDOW_CHUNK]]),
                                  torch.from_numpy(samples.widths[idx[c:c + WINDOW_CHUNK]]))
                       for c in range(0, len(order), WINDOW_CHUNK)]).numpy()
    cuts = np.cumsum([len(b) for b in batches])[:-1]
    return list(zip(np.split(boxes[:, 0:2].astype(np.float32), cuts), np.split(boxes[:, 2:4].astype(np.float32), cuts),
                    np.split(boxes[:, 4].astype(np.int32), cuts), strict=True))


def _build(cfg: DataConfig, ctx: LoaderContext, samples: ShardSamples, batch_size: int) -> _FedPipeline:
    gpu = ctx.device.type == "cuda"
    # One pool thread more than `workers`: DALI's own readers prefetch in a thread beside the pool, while this
    # pipeline is fed from the consumer's thread; the extra thread keeps the cores busy meanwhile (docs/loaders.md).
    pipe = _FedPipeline(samples, batch_size=batch_size, num_threads=cfg.workers + 1,
                        device_id=(ctx.device.index or 0) if gpu else None, seed=ctx.seed * 1_009 + ctx.rank,
                        prefetch_queue_depth=cfg.dali_prefetch, exec_dynamic=True)
    decode = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:
        decode |= {"hw_decoder_load": cfg.dali_hw_decoder_load,
                   "preallocate_width_hint": cfg.dali_preallocate, "preallocate_height_hint": cfg.dali_preallocate}
    normalise = {"dtype": DALI_DTYPES[ctx.dtype], "output_layout": "HWC" if ctx.channels_last else "CHW",
                 "mean": [255 * m for m in cfg.mean], "std": [255 * s for s in cfg.std]}
    with pipe:
        # no_copy: the views stay valid while the shards are mapped, i.e. as long as `samples` lives.
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1, no_copy=True)
        labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
        # fastcd's crop windows, train and val (ROI decoding), resized, mirrored where the plan says
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        res = fn.external_source(name="res", dtype=types.FLOAT, ndim=0)
        images = fn.decoders.image_slice(jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                         axis_names="WH", **decode)
        images = fn.resize(images, resize_x=res, resize_y=res)
        images = fn.crop_mirror_normalize(images, mirror=flip, **normalise)
        pipe.set_outputs(images, labels.gpu() if gpu else labels)
    pipe.build()
    return pipe


class DaliLoader(ShardLoader):
    """Shards decoded and augmented by DALI, in `epoch_indices` order."""

    resampling = "antialiased"  # fn.resize's default: linear, antialiased when shrinking

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        super().__init__(cfg, split, ctx)
        self.pipe = _build(cfg, ctx, self.samples, self.batch_size)
        self.set_epoch(0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches, c = self.batch_indices(), self.cfg
        self.pipe.start(batches, CropPlan(self.train, self.res, c.scale_min, c.val_resize_ratio, self.ctx.seed,
                                          self.epoch))
        stream = torch.cuda.current_stream(self.ctx.device) if self.ctx.device.type == "cuda" else None
        try:
            for _ in batches:
                images, labels = self.pipe.run(stream)
                yield self._images(images), torch.from_dlpack(labels.as_tensor())
        finally:
            self._finish_epoch()

    def _images(self, images) -> Tensor:
        """DALI's NHWC (channels_last) or NCHW batch as an NCHW torch view of the same memory (bf16: rounded)."""
        x = torch.from_dlpack(images.as_tensor())
        if self.ctx.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x.to(self.ctx.dtype)

    def _finish_epoch(self) -> None:
        """Consume what DALI still holds (the whole epoch was read, or the consumer stopped early)."""
        self.pipe.batches, self.pipe.windows = iter(()), iter(())  # and the windows are freed
        while True:
            try:
                self.pipe.run()
            except StopIteration:
                break
        self.pipe.reset()


def dali_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """DALI over the prepared shards of `cfg.path`."""
    return DaliLoader(cfg, split, ctx)
