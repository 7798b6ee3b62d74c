"""The `torch` backend: the prepared shards read by index, decoded with `torchvision.io.decode_jpeg`.

One `DataLoader` with persistent workers over the samples in `epoch_indices` order (its sampler hands
each worker (sample, epoch, resolution), so a new epoch needs no new workers); each sample's crop and
flip come from `crops.CropPlan` (a pure function of seed, epoch and sample), so they depend neither on
the worker count nor on where the crop runs. Two places to decode (`data.decode`):

- `workers` (default on a CPU): each DataLoader worker decodes and crops its samples; uint8 batches.
- `device` (default on CUDA): workers only read the JPEG bytes (one buffer per batch) and each image's
  size from its header; a background thread decodes each batch in one `decode_jpeg(list, device=...)`
  call (nvjpeg on a GPU), then crops, resizes, flips and normalises it in one launch
  (`transforms.resized_crops`), on its own CUDA stream, `PREFETCH` batches ahead of the training step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split
from fastcd.data.crops import CropPlan
from fastcd.data.prepared import ShardSamples, open_prepared
from fastcd.data.transforms import normalize, resized_crops
from fastcd.errors import FastcdError

PREFETCH = 2  # batches decoded ahead on the device


Item = tuple[int, int, int]  # (sample, epoch, resolution): what the sampler hands the workers


class _EpochOrder(Sampler[Item]):
    """The current epoch's samples as (sample, epoch, resolution) items. It lives in the main process and
    is read at each `iter()`, so persistent workers follow the epoch without being restarted."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    def set(self, order: list[int], epoch: int, res: int) -> None:
        self.items = [(i, epoch, res) for i in order]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _Shards(Dataset):
    """Item -> (cropped uint8 image, label), or with `device_decode` (JPEG bytes, label, meta) where meta is
    (x0, y0, w, h, flip, H, W): the box and flip to apply and the image's size, read from its header."""

    def __init__(self, samples: ShardSamples, plan: CropPlan, device_decode: bool) -> None:
        self.samples, self.plan, self.device_decode = samples, plan, device_decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Item) -> tuple[Tensor, int] | tuple[np.ndarray, int, Tensor]:
        i, epoch, res = item
        plan = dataclasses.replace(self.plan, epoch=epoch, res=res)
        jpeg, label = self.samples.jpeg(i), self.samples.label(i)
        if self.device_decode:
            height, width = self.samples.sizes([i])[0].tolist()  # from the header: no decode here
            return jpeg, label, torch.tensor([*plan.box(i, height, width), height, width], dtype=torch.float32)
        image = decode_jpeg(torch.from_numpy(jpeg.copy()), mode=ImageReadMode.RGB)
        if not plan.train:
            image = TF.resize(image, round(res / plan.resize_ratio), antialias=True)
            return TF.center_crop(image, [res, res]), label
        x0, y0, w, h, flip = plan.box(i, image.shape[-2], image.shape[-1])  # whole pixels
        image = TF.resized_crop(image, int(y0), int(x0), int(h), int(w), [res, res], antialias=True)
        return (image.flip(-1) if flip else image), label


def _collate_bytes(items: list[tuple[np.ndarray, int, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One buffer of the batch's JPEG bytes and their sizes (a single tensor crosses from the worker, not
    one per image), the labels and the meta rows."""
    jpegs, labels, meta = zip(*items)
    return (torch.from_numpy(np.concatenate(jpegs)), torch.tensor([len(j) for j in jpegs]), torch.tensor(labels),
            torch.stack(meta))


@functools.cache
def _worker_start() -> multiprocessing.context.BaseContext:
    """How the workers start: from a fork server that imported this module, never as a fork of this process,
    which may already run other threads (DALI's, CUDA's, a prefetch thread); a fork copies the locks they
    hold, and a worker could wait on one forever."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class ShardsTorchLoader(IndexedLoader):
    """Shards -> torchvision decode (in CPU workers, or batched on the device) -> device batches."""

    replays_crops = True

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        prepared = open_prepared(cfg.path, split, ctx, "dali")
        self.prepared = prepared
        self.samples = ShardSamples(prepared)
        super().__init__(cfg, split, ctx, len(self.samples))
        self.num_classes = len(prepared.classes)
        self.device_decode = cfg.decode == "device" or (cfg.decode == "auto" and ctx.device.type == "cuda")
        plan = CropPlan(self.train, 0, cfg.scale_min, cfg.val_resize_ratio, ctx.seed, 0)
        self.sampler = _EpochOrder()
        self.loader = DataLoader(_Shards(self.samples, plan, self.device_decode), batch_size=self.batch_size,
                                 sampler=self.sampler, num_workers=cfg.workers,
                                 drop_last=self.train and not ctx.keep_last,
                                 persistent_workers=cfg.workers > 0, pin_memory=ctx.device.type == "cuda",
                                 collate_fn=_collate_bytes if self.device_decode else None,
                                 multiprocessing_context=_worker_start() if cfg.workers > 0 else None)
        self.set_epoch(0)

    def fingerprint(self) -> str:
        return self.prepared.fingerprint()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.sampler.set(self.order.tolist(), epoch, self.res)

    def _device_batch(self, data: Tensor, sizes: Tensor, labels: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        """Decode, crop and normalise one batch on the device (in the prefetch thread)."""
        dev, cfg = self.ctx.device, self.cfg
        images = decode_jpeg(list(data.split(sizes.tolist())), mode=ImageReadMode.RGB, device=dev)
        sizes = meta[:, 5:7].tolist()  # host values of a host tensor: no device sync
        for image, (h, w), i in zip(images, sizes, range(len(images))):
            if tuple(image.shape[1:]) != (h, w):
                raise FastcdError(f"batch sample {i}: the JPEG header says {int(h)}x{int(w)} but it decodes to "
                                  f"{tuple(image.shape[1:])}; re-run `fastcd prepare`")
        out = resized_crops(images, meta.to(dev, non_blocking=True), self.res, cfg.mean, cfg.std, self.ctx.dtype,
                            self.ctx.channels_last)
        return out, labels.to(dev, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.device_decode:  # the workers start here, in this thread, before the decode thread does
            yield from _prefetched(iter(self.loader), self._device_batch, self.ctx.device)
            return
        for images, labels in self.loader:
            images = images.to(self.ctx.device, non_blocking=True)
            yield (normalize(images, self.cfg.mean, self.cfg.std, self.ctx.dtype, self.ctx.channels_last),
                   labels.to(self.ctx.device, non_blocking=True))


def _prefetched(batches: Iterator[tuple], make: Callable[..., tuple[Tensor, Tensor]],
                device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """`make(*batch)` for each of `batches`, run `PREFETCH` batches ahead in a thread (on its own
    CUDA stream, which the consumer's stream waits for). Errors are raised in the consumer; stopping
    early stops the thread."""
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in batches:
                    out = make(*batch)
                    event = torch.cuda.Event() if cuda else None
                    if cuda:
                        event.record(side)
                    if not put(("batch", out, event)):
                        return
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e, None))
            return
        put(("end", None, None))

    thread = threading.Thread(target=produce, name="fastcd-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, item, event = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in item:
                    t.record_stream(current)
            yield item
    finally:
        stop.set()
        thread.join()


def shards_torch_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """torchvision decoding of the prepared shards of `cfg.path`."""
    return ShardsTorchLoader(cfg, split, ctx)
