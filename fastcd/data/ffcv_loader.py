"""The `ffcv` backend: FFCV's `Loader` over the prepared `.beton`, normalised in torch on the device.

Train: RandomResizedCrop decoder + flip, `RANDOM` (or `QUASI_RANDOM`) order seeded by the run,
`distributed=True` under DDP (ffcv's DistributedSampler: needs torch.distributed initialised).
Val: centre-crop decoder, sequential, each rank reading its strided share (`epoch_indices`), so the
ranks cover every sample once. Pixels stay uint8 until the device and are normalised there by
`transforms.normalize`, one op for every backend (FFCV's NormalizeImage is not used).
"""
from __future__ import annotations

from collections.abc import Iterator

from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from torch import Tensor

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, LoaderContext, Split
from fastcd.data.crops import RATIO
from fastcd.data.prepared import open_prepared
from fastcd.data.resolution import train_res
from fastcd.data.sharding import epoch_indices
from fastcd.data.transforms import normalize
from fastcd.errors import FastcdError

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}


class FfcvLoader(BatchLoader):
    """FFCV decode + augmentation in numba threads; uint8 batches normalised on the device."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        prepared = open_prepared(cfg.path, split, ctx, "ffcv")
        self.num_classes = len(prepared.classes)
        self.train = split == "train"
        n = prepared.num_samples
        limit = cfg.train_subset if self.train else cfg.val_subset
        size = min(limit, n) if limit else n
        if self.train:
            self.decoder = RandomResizedCropRGBImageDecoder((cfg.res, cfg.res), scale=(cfg.scale_min, 1.0), ratio=RATIO)
            augment = [RandomHorizontalFlip()]
            indices = range(size) if size < n else None
            order, distributed = ORDERS[cfg.ffcv_order], ctx.world_size > 1
            if cfg.ffcv_order == "quasi_random" and (cfg.ffcv_os_cache or distributed):
                raise FastcdError("data.ffcv_order quasi_random needs data.ffcv_os_cache false and a single process "
                                  "(ffcv has no distributed quasi_random); use ffcv_order random")
        else:
            self.decoder = CenterCropRGBImageDecoder((cfg.val_res, cfg.val_res), ratio=cfg.val_resize_ratio)
            augment = []
            indices = epoch_indices(size, epoch=0, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size,
                                    train=False).numpy()
            order, distributed = OrderOption.SEQUENTIAL, False
        # On a CPU the batch is already where it belongs: ToDevice would only add a copy of it.
        to_device = [ToDevice(ctx.device, non_blocking=True)] if ctx.device.type == "cuda" else []
        # Squeeze(1), not Squeeze(): the (B, 1) labels stay 1-D when a batch holds one sample.
        pipelines = {"image": [self.decoder, *augment, ToTensor(), *to_device, ToTorchImage(channels_last=True)],
                     "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device]}
        batch_size = cfg.batch_size if self.train else (cfg.val_batch_size or cfg.batch_size)
        try:
            self.loader = Loader(str(prepared.beton), batch_size=batch_size, num_workers=max(1, cfg.workers),
                                 os_cache=cfg.ffcv_os_cache, order=order, distributed=distributed, seed=ctx.seed,
                                 indices=indices, pipelines=pipelines, drop_last=self.train)
        except (ValueError, OSError, KeyError, AssertionError) as e:
            raise FastcdError(f"{prepared.beton} cannot be read by ffcv ({type(e).__name__}: {e}); "
                              f"re-run `fastcd prepare`") from e
        if self.loader.reader.num_samples != n:
            raise FastcdError(f"{prepared.beton} holds {self.loader.reader.num_samples} samples, the manifest {n}; "
                              f"re-run `fastcd prepare`")
        self.num_samples = len(self.loader.first_traversal_order)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch:
            raise FastcdError("the ffcv backend cannot start an epoch mid-way (its order is ffcv's own); "
                              "use data.backend torch or dali, or train.checkpoint_every_steps=0")
        self.loader.next_epoch = epoch
        if self.train:
            res = train_res(self.cfg, epoch)
            self.decoder.output_size = (res, res)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        c = self.cfg
        for images, labels in self.loader:
            yield normalize(images, c.mean, c.std, self.ctx.dtype, self.ctx.channels_last), labels


def ffcv_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """FFCV over the prepared `.beton` of `cfg.path`."""
    return FfcvLoader(cfg, split, ctx)
