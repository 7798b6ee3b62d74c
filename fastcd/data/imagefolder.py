"""The original data path: torchvision ImageFolder + PIL transforms in DataLoader workers.

The baseline every loader benchmark compares against. Pixels leave the workers as uint8 and are
normalised on the training device. A file that cannot be an image (empty, unreadable, a symlink loop, not a
regular file) is skipped when the folder is opened and listed in one line on stderr; a file that fails to
decode stops the run with a one-line error naming it.
"""
from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, pil_loader
from torchvision.transforms import v2

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, IndexedLoader, LoaderContext, Split
from fastcd.data.transforms import normalize
from fastcd.errors import FastcdError
from fastcd.utils.lifeline import end_with_parent


class _EpochSampler(Sampler[int]):
    def __init__(self, indices: Tensor) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


def unusable(path: str) -> str | None:
    """Why the file at `path` cannot be an image, from its metadata alone (no decode), or None."""
    try:
        info = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file"
    return None if os.access(path, os.R_OK) else "cannot be read (permission denied)"


def load_image(path: str) -> Image.Image:
    """The RGB image at `path`; a file that does not decode is a one-line error naming it."""
    try:
        return pil_loader(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise FastcdError(f"{path} cannot be decoded ({type(e).__name__}: {e}); remove it, or read the tree through "
                          "`fastcd prepare`, which skips such files") from None


def open_image_folder(root: Path) -> torchvision.datasets.ImageFolder:
    """An ImageFolder over `root`, with missing or empty folders reported as one-line errors and files that
    cannot be images skipped (listed in one line on stderr): one bad file costs that file only."""
    if not root.is_dir():
        raise FastcdError(f"dataset folder {str(root)!r} does not exist")
    empty = sorted(p.name for p in root.iterdir() if p.is_dir() and not any(p.iterdir()))
    if empty:
        raise FastcdError(f"class folder {str(root / empty[0])!r} is empty ({len(empty)} empty class folders)")
    skipped: list[str] = []

    def usable(path: str) -> bool:
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            return False
        reason = unusable(path)
        if reason:
            skipped.append(f"{os.path.relpath(path, root)} ({reason})")
        return reason is None

    try:
        dataset = torchvision.datasets.ImageFolder(str(root), loader=load_image, is_valid_file=usable)
    except (FileNotFoundError, RuntimeError) as e:
        raise FastcdError(f"{str(root)!r} is not an ImageFolder tree (<class>/<image>): {e}") from None
    if skipped:
        sys.stderr.write(f"{root}: skipped {len(skipped)} file(s) that cannot be images: {', '.join(skipped[:5])}"
                         f"{', ...' if len(skipped) > 5 else ''}\n")
    return dataset


class ImageFolderLoader(IndexedLoader):
    """ImageFolder + PIL RandomResizedCrop/flip (train) or Resize/CenterCrop (val) in workers."""

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        if not cfg.path:
            raise FastcdError("data.path is empty; set it to an ImageFolder tree (<path>/train/<class>/<image>, "
                              "<path>/val/...), or choose another data.backend")
        self.dataset = open_image_folder(Path(cfg.path) / split)
        super().__init__(cfg, split, ctx, len(self.dataset))
        self.num_classes = len(self.dataset.classes)
        if self.num_classes != ctx.num_classes:
            raise FastcdError(f"{cfg.path}/{split} has {self.num_classes} classes but the model has "
                              f"num_classes={ctx.num_classes}")
        self.set_epoch(0)

    def _transform(self, res: int) -> v2.Compose:
        if self.train:
            ops = [v2.RandomResizedCrop(res, scale=(self.cfg.scale_min, 1.0), antialias=True),
                   v2.RandomHorizontalFlip()]
        else:
            ops = [v2.Resize(round(res / self.cfg.val_resize_ratio), antialias=True), v2.CenterCrop(res)]
        return v2.Compose([v2.PILToTensor(), *ops])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.dataset.transform = self._transform(self.res)
        self.loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=_EpochSampler(self.order),
                                 num_workers=self.cfg.workers, pin_memory=self.ctx.device.type == "cuda",
                                 drop_last=self.train, persistent_workers=False,
                                 worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(
                                     self.ctx.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        try:
            for images, labels in self.loader:
                images = images.to(self.ctx.device, non_blocking=True)
                yield (normalize(images, self.cfg.mean, self.cfg.std, self.ctx.dtype, self.ctx.channels_last),
                       labels.to(self.ctx.device, non_blocking=True))
        except FastcdError as e:  # from a worker, re-raised with its traceback as text: keep the error's own line
            line = str(e).strip().splitlines()[-1]
            raise FastcdError(line.removeprefix(f"{FastcdError.__module__}.FastcdError: ")) from None


def _seed_worker(worker_id: int) -> None:
    """A worker's own random stream; it ends with the training process."""
    end_with_parent()
    torch.manual_seed(torch.initial_seed() % 2**32 + worker_id)


def imagefolder_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """The original ImageFolder pipeline over `cfg.path/<split>`."""
    return ImageFolderLoader(cfg, split, ctx)
