"""The crop of each sample as a pure function of (seed, epoch, sample) and the image's size.

A backend that reads samples by index asks `CropPlan.box` for the box (x0, y0, w, h in source pixels)
and the flip of sample i, and only executes them: the crop does not depend on the worker count, on
where it runs (a worker's CPU or the GPU) or on the decoder. Training: torchvision's RandomResizedCrop
draw (`transforms.crop_boxes`) + a fair flip, from a generator seeded by (seed, epoch, i). Validation:
the box that a resize of the short side to res / resize_ratio followed by a centre res x res crop reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcd.data.transforms import RATIO, crop_boxes

Box = tuple[float, float, float, float, bool]  # x0, y0, w, h (source pixels), flip


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, epoch, index)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)


def center_box(height: int, width: int, res: int, resize_ratio: float) -> Box:
    """The source box of `transforms.center_crop`: short side resized to round(res / ratio), centre res x res."""
    short = round(res / resize_ratio)
    scale = short / min(height, width)
    rh, rw = max(short, round(height * scale)), max(short, round(width * scale))
    sy, sx = rh / height, rw / width
    return ((rw - res) // 2 / sx, (rh - res) // 2 / sy, res / sx, res / sy, False)


@dataclass(frozen=True)
class CropPlan:
    """What to crop from each sample of one epoch of one split."""

    train: bool
    res: int
    scale_min: float
    resize_ratio: float
    seed: int
    epoch: int

    def box(self, index: int, height: int, width: int) -> Box:
        """The box and flip of sample `index`, an image of height x width pixels."""
        if not self.train:
            return center_box(height, width, self.res, self.resize_ratio)
        g = sample_generator(self.seed, self.epoch, index)
        x0, y0, w, h = crop_boxes(1, height, width, (self.scale_min, 1.0), RATIO, g)[0].tolist()
        return (x0, y0, w, h, bool(torch.rand(1, generator=g).item() < 0.5))
