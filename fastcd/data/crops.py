"""The crop of each sample as a pure function of (seed, epoch, sample) and the image's size.

A backend asks `CropPlan.boxes` for the box (x0, y0, w, h in source pixels) and the flip of each sample
of a batch (one vectorised call per batch, never per sample), and only executes them: the crop depends
neither on the batch it lands in, nor the worker count, nor where it runs (a worker's CPU, the GPU) or
which decoder made the pixels. Training: torchvision's RandomResizedCrop draw (`crop_boxes`) and a fair
flip, from counter-based random numbers of (seed, epoch, sample) (`uniforms`). Validation: the centred
box that a resize of the short side to res / resize_ratio followed by a centre res x res crop reads
(`center_boxes`). This is the one definition of every crop, train and val: each backend executes these
boxes (resampling them to res x res), none computes its own.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
TRIES = 10  # RandomResizedCrop's draws before its centre-crop fallback
DRAWS = 2 * TRIES + 3  # per sample: TRIES scales, TRIES ratios, x0, y0, flip
# A crop row, as every executor of the crops reads it (`CropPlan.rows`): the box in source pixels, the
# flip (1.0 or 0.0) and the image's size. Every box is in whole pixels.
ROW = ("x0", "y0", "w", "h", "flip", "height", "width")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: Sequence[int] | Tensor, n: int) -> Tensor:
    """(len(indices), n) float64 numbers in [0, 1): row r depends only on (seed, epoch, indices[r])."""
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.uint64(seed % 2**64) + _GOLDEN) ^ np.uint64(epoch % 2**64))
        base = _mix(key ^ (idx * _GOLDEN + _GOLDEN))
        z = _mix(base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def crop_boxes(heights: Tensor, widths: Tensor, u: Tensor, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO) -> Tensor:
    """(B, 4) float64 boxes (x0, y0, w, h) in pixels, drawn as torchvision's RandomResizedCrop draws them
    (TRIES scale/log-ratio draws, the first that fits, else the whole image clamped to the ratio range,
    centred), for images of per-row size, from the first 2 * TRIES + 2 columns of `u` (`uniforms`)."""
    H, W = heights.double()[:, None], widths.double()[:, None]
    s = (scale[0] + (scale[1] - scale[0]) * u[:, :TRIES]) * H * W
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = (lo + (hi - lo) * u[:, TRIES:2 * TRIES]).exp()
    w, h = (s * r).sqrt().round(), (s / r).sqrt().round()
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = ok.double().argmax(1, keepdim=True)
    H, W = H[:, 0], W[:, 0]
    in_ratio = W / H
    fb_w = torch.where(in_ratio > ratio[1], (H * ratio[1]).round(), W)
    fb_h = torch.where(in_ratio < ratio[0], (W / ratio[0]).round(), H).clamp(max=H)
    bad = ~ok.any(1)
    w_sel = torch.where(bad, fb_w, w.gather(1, first)[:, 0])
    h_sel = torch.where(bad, fb_h, h.gather(1, first)[:, 0])
    x0 = torch.where(bad, ((W - w_sel) / 2).floor(), (u[:, 2 * TRIES] * (W - w_sel + 1)).floor())
    y0 = torch.where(bad, ((H - h_sel) / 2).floor(), (u[:, 2 * TRIES + 1] * (H - h_sel + 1)).floor())
    return torch.stack([x0, y0, w_sel, h_sel], dim=1)


def center_boxes(heights: Tensor, widths: Tensor, res: int, resize_ratio: float) -> Tensor:
    """(B, 4) float64 validation boxes (x0, y0, w, h) in whole pixels: the centred square that a resize of
    the short side to round(res / resize_ratio) followed by a centre res x res crop reads, i.e. of side
    round(res * short side / round(res / resize_ratio)), at offsets floor((side of image - box) / 2)."""
    h, w = heights.double(), widths.double()
    short = torch.minimum(h, w)
    side = (res * short / round(res / resize_ratio)).round().clamp(1, None).minimum(short)
    return torch.stack([((w - side) / 2).floor(), ((h - side) / 2).floor(), side, side], dim=1)


@dataclass(frozen=True)
class CropPlan:
    """What to crop from each sample of one epoch of one split."""

    train: bool
    res: int
    scale_min: float
    resize_ratio: float
    seed: int
    epoch: int

    def boxes(self, indices: Sequence[int] | Tensor, heights: Tensor, widths: Tensor) -> Tensor:
        """(B, 5) float64 rows (x0, y0, w, h, flip) of the samples `indices`, images of per-row size: one
        vectorised call per batch."""
        if not self.train:
            return torch.cat([center_boxes(heights, widths, self.res, self.resize_ratio),
                              torch.zeros(len(heights), 1, dtype=torch.float64)], dim=1)
        u = uniforms(self.seed, self.epoch, indices, DRAWS)
        flip = (u[:, 2 * TRIES + 2] < 0.5).double()
        return torch.cat([crop_boxes(heights, widths, u, (self.scale_min, 1.0)), flip[:, None]], dim=1)

    def rows(self, indices: Sequence[int] | Tensor, heights: Tensor, widths: Tensor) -> Tensor:
        """(B, len(ROW)) float32 crop rows (`ROW`) of the samples: what an executor of the crops reads."""
        return torch.cat([self.boxes(indices, heights, widths), heights.double()[:, None],
                          widths.double()[:, None]], dim=1).float()
