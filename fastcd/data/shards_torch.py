"""The `torch` backend: the prepared shards read by index, decoded with `torchvision.io.decode_jpeg`.

A `DataLoader` over the samples in `epoch_indices` order; each sample's crop and flip come from
`crops.CropPlan` (a pure function of seed, epoch and sample), so they depend neither on the worker
count nor on where the crop runs. Two places to decode (`data.decode`):

- `workers` (default on a CPU): each DataLoader worker decodes and crops its samples; uint8 batches.
- `device` (default on CUDA): workers only read the JPEG bytes and the image size from its header;
  a background thread decodes each batch in one `decode_jpeg(list, device=...)` call (nvjpeg on a
  GPU), then crops, resizes, flips and normalises it in one launch (`transforms.resized_crops`), on
  its own CUDA stream, `PREFETCH` batches ahead of the training step.
"""
from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split, register_loader
from fastcd.data.crops import CropPlan
from fastcd.data.prepared import ShardSamples, open_prepared
from fastcd.data.transforms import normalize, resized_crops
from fastcd.errors import FastcdError

PREFETCH = 2  # batches decoded ahead on the device


class _Shards(Dataset):
    """Sample i -> (cropped uint8 image, label), or with `device_decode` (JPEG bytes, label, meta) where
    meta is (x0, y0, w, h, flip, H, W): the box and flip to apply and the image's size."""

    def __init__(self, samples: ShardSamples, plan: CropPlan, device_decode: bool) -> None:
        self.samples, self.plan, self.device_decode = samples, plan, device_decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | tuple[Tensor, int, Tensor]:
        data = torch.from_numpy(self.samples.jpeg(i).copy())
        label = self.samples.label(i)
        if self.device_decode:
            width, height = Image.open(io.BytesIO(data.numpy().tobytes())).size  # the header only
            return data, label, torch.tensor([*self.plan.box(i, height, width), height, width], dtype=torch.float32)
        image, res = decode_jpeg(data, mode=ImageReadMode.RGB), self.plan.res
        if not self.plan.train:
            image = TF.resize(image, round(res / self.plan.resize_ratio), antialias=True)
            return TF.center_crop(image, [res, res]), label
        x0, y0, w, h, flip = self.plan.box(i, image.shape[-2], image.shape[-1])  # whole pixels
        image = TF.resized_crop(image, int(y0), int(x0), int(h), int(w), [res, res], antialias=True)
        return (image.flip(-1) if flip else image), label


def _collate_bytes(items: list[tuple[Tensor, int, Tensor]]) -> tuple[list[Tensor], Tensor, Tensor]:
    data, labels, meta = zip(*items)
    return list(data), torch.tensor(labels), torch.stack(meta)


class ShardsTorchLoader(IndexedLoader):
    """Shards -> torchvision decode (in CPU workers, or batched on the device) -> device batches."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        prepared = open_prepared(cfg.path, split, ctx, "dali")
        self.samples = ShardSamples(prepared)
        super().__init__(cfg, split, ctx, len(self.samples))
        self.num_classes = len(prepared.classes)
        self.device_decode = cfg.decode == "device" or (cfg.decode == "auto" and ctx.device.type == "cuda")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        c, cfg = self.ctx, self.cfg
        plan = CropPlan(self.train, self.res, cfg.scale_min, cfg.val_resize_ratio, c.seed, epoch)
        pin = c.device.type == "cuda"
        self.loader = DataLoader(_Shards(self.samples, plan, self.device_decode), batch_size=self.batch_size,
                                 sampler=self.order.tolist(), num_workers=cfg.workers, drop_last=self.train,
                                 pin_memory=pin, collate_fn=_collate_bytes if self.device_decode else None)

    def _device_batch(self, data: list[Tensor], labels: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        """Decode, crop and normalise one batch on the device (in the prefetch thread)."""
        dev, cfg = self.ctx.device, self.cfg
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
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


@register_loader("torch")
def shards_torch_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """torchvision decoding of the prepared shards of `cfg.path`."""
    return ShardsTorchLoader(cfg, split, ctx)
