"""The `torch` backend: the prepared shards read by batch, decoded with `torchvision.io.decode_jpeg`.

Everything the host does is done per batch, from the split's sample table (labels, image sizes, where
each JPEG lies) and `crops.CropPlan.rows` (every crop box and flip of the batch in one vectorised call).
Two places to decode (`data.decode`):

- `device` (default on CUDA): no worker process. One thread (`feed.HostFeed`) gathers each batch's JPEG
  bytes from the memory-mapped shards into a reused pinned buffer; a second decodes the batch in one
  `decode_jpeg(list, device=...)` call (nvjpeg on a GPU) and crops, resizes, flips and normalises it in one
  launch that reads the decoded images in place (`transforms.resized_crops`), on its own CUDA stream. Both
  run `PREFETCH` batches ahead of the training step. `data.workers` is not used: the host's share costs
  microseconds per image (`fastcd bench feed`), which one thread sustains.
- `workers` (default on a CPU): `data.workers` persistent DataLoader processes each decode and crop whole
  batches (torchvision's antialiased `resized_crop` of each box); uint8 batches.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import multiprocessing.forkserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, LoaderContext, Split
from fastcd.data.crops import CropPlan
from fastcd.data.feed import FedBatch, HostFeed, staged
from fastcd.data.prepared import ShardLoader, ShardSamples
from fastcd.data.transforms import normalize, resized_crops
from fastcd.errors import FastcdError
from fastcd.utils.lifeline import end_with_parent

PREFETCH = 2  # batches each stage (host feed, device decode) works ahead of its consumer
SLOTS = PREFETCH + 2  # host buffers: queued for the decoder, being decoded, being filled


Item = tuple[Tensor, int, int]  # (sample indices of one batch, epoch, resolution): what the workers get


class _EpochBatches(Sampler[Item]):
    """The current epoch's batches as items. It lives in the main process and is read at each `iter()`, so
    persistent workers follow the epoch without being restarted."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    def set(self, batches: list[Tensor], epoch: int, res: int) -> None:
        self.items = [(b, epoch, res) for b in batches]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@functools.cache
def _worker_start() -> multiprocessing.context.BaseContext:
    """How the workers start: from a fork server that imported this module, never as a fork of this process,
    which may already run other threads (DALI's, CUDA's, the feed's); a fork copies the locks they hold, and
    a worker could wait on one forever. Each worker ends with this process (`worker_init_fn=end_with_parent`),
    and the fork server ends once its workers and this process are gone. The server starts here, when the first
    loader is built, so that its imports (seconds) overlap the rest of the run's setup rather than delaying the
    first batch."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    multiprocessing.forkserver.ensure_running()
    return ctx


def _check_sizes(images: list[Tensor], rows: Tensor) -> None:
    """Each decoded image has the size the sample table gives it."""
    got = torch.tensor([im.shape[1:] for im in images], dtype=torch.float32).reshape(-1, 2)
    bad = (got != rows[:, 5:7]).any(1).nonzero()
    if len(bad):
        i = int(bad[0])
        raise FastcdError(f"batch sample {i}: the sample table says {int(rows[i, 5])}x{int(rows[i, 6])} but it "
                          f"decodes to {int(got[i, 0])}x{int(got[i, 1])}; run `fastcd prepare --verify`")


@dataclass(frozen=True)
class WorkerFailure:
    """A batch a worker could not make, as the one line the main process raises (a DataLoader re-raises a
    worker's exception with the worker's traceback in its message)."""

    message: str


class _Batches(Dataset):
    """Item -> (uint8 (B, 3, res, res) crops, labels), decoded and cropped in a worker process; a
    `WorkerFailure` for a batch with a sample that does not decode or has another size than its table's."""

    def __init__(self, samples: ShardSamples, plan: CropPlan) -> None:
        self.samples, self.plan = samples, plan

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Item) -> tuple[Tensor, Tensor] | WorkerFailure:
        try:
            return self._batch(item)
        except FastcdError as e:
            return WorkerFailure(str(e))

    def _batch(self, item: Item) -> tuple[Tensor, Tensor]:
        indices, epoch, res = item
        s, idx = self.samples, item[0].numpy()
        rows = dataclasses.replace(self.plan, epoch=epoch, res=res).rows(
            indices, torch.from_numpy(s.heights[idx]), torch.from_numpy(s.widths[idx]))
        out = torch.empty((len(idx), 3, res, res), dtype=torch.uint8)
        images = []
        for k, (i, (x0, y0, w, h, flip, _, _)) in enumerate(zip(idx.tolist(), rows.tolist())):
            try:
                image = decode_jpeg(torch.from_numpy(s.jpeg(i).copy()), mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise s.undecodable(i, e) from None
            images.append(image)
            crop = TF.resized_crop(image, int(y0), int(x0), int(h), int(w), [res, res], antialias=True)
            out[k] = crop.flip(-1) if flip else crop
        _check_sizes(images, rows)
        return out, torch.from_numpy(s.labels[idx])


class ShardsTorchLoader(ShardLoader):
    """Shards -> torchvision decode (batched on the device, or in CPU workers) -> device batches."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        super().__init__(cfg, split, ctx)
        self.device_decode = cfg.decode == "device" or (cfg.decode == "auto" and ctx.device.type == "cuda")
        self.resampling = "area" if self.device_decode else "antialiased"
        self.plan = CropPlan(self.train, 0, cfg.scale_min, cfg.val_resize_ratio, ctx.seed, 0)
        if self.device_decode:
            self.feed = HostFeed(self.samples, SLOTS, pin=ctx.device.type == "cuda")
            self._active: Iterator[tuple[Tensor, Tensor]] | None = None
        else:
            self.sampler = _EpochBatches()
            self.loader = DataLoader(_Batches(self.samples, self.plan), batch_size=None, sampler=self.sampler,
                                     num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                                     pin_memory=ctx.device.type == "cuda", worker_init_fn=end_with_parent,
                                     multiprocessing_context=_worker_start() if cfg.workers > 0 else None)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        if not self.device_decode:
            self.sampler.set(self.batch_indices(), epoch, self.res)

    def _decode(self, batch: FedBatch, stop: threading.Event) -> tuple[Tensor, Tensor]:
        """Decode, crop and normalise one batch on the device (in the decode thread)."""
        dev, cfg = self.ctx.device, self.cfg
        jpegs = list(batch.data.split(batch.lengths.tolist()))
        try:
            images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=dev)
        except RuntimeError:  # the batch's decode failed: find the sample, one by one on the host
            for k, i in enumerate(batch.indices.tolist()):
                try:
                    decode_jpeg(jpegs[k].cpu(), mode=ImageReadMode.RGB)
                except RuntimeError as one:
                    raise self.samples.undecodable(i, one) from None
            raise  # each decodes alone: not a damaged sample
        event = None
        if dev.type == "cuda":  # the buffer is free once the decode's reads of it are done
            event = torch.cuda.Event()
            event.record()
        self.feed.release(batch, event)
        _check_sizes(images, batch.rows)
        out = resized_crops(images, batch.rows.to(dev, non_blocking=True), self.res, cfg.mean, cfg.std,
                            self.ctx.dtype, self.ctx.channels_last)
        return out, batch.labels.to(dev, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.device_decode:
            if self._active is not None:  # an earlier epoch's stages, left unfinished: stopped before the buffers
                self._active.close()      # are handed out again
            plan = dataclasses.replace(self.plan, epoch=self.epoch, res=self.res)
            self.feed.reset(self.ctx.device)
            fed = staged(self.batch_indices(), lambda indices, stop: self.feed.batch(indices, plan, stop), PREFETCH,
                         torch.device("cpu"), "fastcd-feed")
            self._active = staged(fed, self._decode, PREFETCH, self.ctx.device, "fastcd-decode")
            yield from self._active
            return
        for batch in self.loader:
            if isinstance(batch, WorkerFailure):
                raise FastcdError(batch.message)
            images, labels = batch
            images = images.to(self.ctx.device, non_blocking=True)
            yield (normalize(images, self.cfg.mean, self.cfg.std, self.ctx.dtype, self.ctx.channels_last),
                   labels.to(self.ctx.device, non_blocking=True))


def shards_torch_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """torchvision decoding of the prepared shards of `cfg.path`."""
    return ShardsTorchLoader(cfg, split, ctx)
