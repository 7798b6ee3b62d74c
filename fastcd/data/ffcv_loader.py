"""The `ffcv` backend: FFCV's `Loader` over the prepared `.beton`, executing fastcd's crops.

FFCV decodes in its compiled numba threads, as it does with its own decoders, but each sample's crop box and
flip come from `crops.CropPlan` (train and val), written for the epoch's samples into a table the decoder
reads (`ffcv_crops`), and the batches follow `sharding.epoch_indices` (each rank its disjoint share): the
crops and batches of every other replaying backend, so a teacher cache replays and a run can resume mid-epoch.
The boxes are resampled area-averaged when shrinking and bilinearly when enlarging (`ffcv_crops`; FFCV's
own decoders enlarge with OpenCV's `INTER_AREA`, nearest-like). Pixels stay uint8 until the device and are
normalised there by `transforms.normalize`, one op for every backend (FFCV's NormalizeImage is not used).
"""
from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split
from fastcd.data.crops import CropPlan
from fastcd.data.ffcv_crops import CropTable, PlannedCropDecoder, PlannedOrder
from fastcd.data.prepared import open_prepared
from fastcd.data.transforms import normalize
from fastcd.data_prep.manifest import load_manifest
from fastcd.errors import FastcdError

CHUNK = 1 << 16  # samples per vectorised CropPlan call when the crop table is written


def _stop(epoch: EpochIterator) -> None:
    """End FFCV's epoch thread (it may be waiting to hand over a batch nobody takes) and free its memory."""
    epoch.terminate_event.set()
    while epoch.is_alive():
        with contextlib.suppress(queue.Empty):
            epoch.output_queue.get(timeout=0.1)
    epoch.close()


class FfcvLoader(IndexedLoader):
    """FFCV decode in numba threads, executing `CropPlan`'s boxes; uint8 batches normalised on the device."""

    replays_crops = True
    resampling = "area"

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        self.prepared = open_prepared(cfg.path, split, ctx, "ffcv")
        super().__init__(cfg, split, ctx, self.prepared.num_samples)
        self.num_classes = len(self.prepared.classes)
        n = self.prepared.num_samples
        self.table = CropTable(n)
        self.planned = PlannedOrder(np.arange(self.size))  # the longest order an epoch of this rank can have
        res = cfg.res if self.train else cfg.val_res
        self.decoder = PlannedCropDecoder((res, res), self.table)
        self.compiled_res = res
        # On a CPU the batch is already where it belongs: ToDevice would only add a copy of it.
        to_device = [ToDevice(ctx.device, non_blocking=True)] if ctx.device.type == "cuda" else []
        # Squeeze(1), not Squeeze(): the (B, 1) labels stay 1-D when a batch holds one sample.
        pipelines = {"image": [self.decoder, ToTensor(), *to_device, ToTorchImage(channels_last=True)],
                     "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device]}
        # numba refuses more threads than the machine's CPUs: data.workers above that count gets them all
        threads = max(1, min(cfg.workers, numba.config.NUMBA_NUM_THREADS))
        try:
            self.loader = Loader(str(self.prepared.beton), batch_size=self.batch_size,
                                 num_workers=threads, os_cache=cfg.ffcv_os_cache, order=self.planned,
                                 pipelines=pipelines, drop_last=False)
        except (ValueError, OSError, KeyError, AssertionError) as e:
            raise FastcdError(f"{self.prepared.beton} cannot be read by ffcv ({type(e).__name__}: {e}); "
                              f"re-run `fastcd prepare`") from e
        if self.loader.reader.num_samples != n:
            raise FastcdError(f"{self.prepared.beton} holds {self.loader.reader.num_samples} samples, the manifest "
                              f"{n}; re-run `fastcd prepare`")
        reader = self.loader.reader
        image = reader.metadata[f"f{reader.field_names.index('image')}"]
        self.heights = torch.from_numpy(image["height"].astype(np.int64))
        self.widths = torch.from_numpy(image["width"].astype(np.int64))
        self._epoch: EpochIterator | None = None
        self.set_epoch(0)

    def fingerprint(self) -> str:
        """The prepared split's digest (`PreparedSplit.fingerprint`), the shards' readers' too when the `.beton`
        holds the shards' JPEG bytes (`ffcv_write_mode: jpg`); any other write mode decoded or re-encoded them,
        so the digest then names the mode and no cache is shared with the shards' readers."""
        mode = load_manifest(self.prepared.root)["options"].get("ffcv_write_mode", "jpg")
        digest = self.prepared.fingerprint()
        return digest if mode == "jpg" else f"{digest} (.beton written with ffcv_write_mode {mode})"

    def _write_crops(self, order: Tensor) -> None:
        """The crop table's rows for the samples of this epoch's `order`, one vectorised call per CHUNK."""
        c = self.cfg
        plan = CropPlan(self.train, self.res, c.scale_min, c.val_resize_ratio, self.ctx.seed, self.epoch)
        for idx in order.split(CHUNK):
            self.table.write(idx.numpy(), plan.boxes(idx, self.heights[idx], self.widths[idx]).numpy())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._epoch is not None:  # an earlier epoch the consumer left unfinished: its thread reads the table
            _stop(self._epoch)
        order = self.order[:len(self) * self.batch_size]
        self._write_crops(order)
        if self.res != self.compiled_res:  # the resolution schedule: FFCV sizes its buffers at code generation
            self.decoder.output_size = (self.res, self.res)
            self.loader.generate_code()
            self.compiled_res = self.res
        self.planned.indices = order.numpy()
        self._epoch = epoch = iter(self.loader)
        c = self.cfg
        try:
            for images, labels in epoch:
                yield normalize(images, c.mean, c.std, self.ctx.dtype, self.ctx.channels_last), labels
        finally:
            _stop(epoch)
            self._epoch = None


def ffcv_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """FFCV over the prepared `.beton` of `cfg.path`."""
    return FfcvLoader(cfg, split, ctx)
