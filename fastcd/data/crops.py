"""The crop of each sample as a pure function of (seed, epoch, sample) and the image's size.

A backend asks `CropPlan.boxes` for the box (x0, y0, w, h in source pixels) and the flip of each sample
of a batch, and only executes them: the crop depends neither on the batch it lands in, nor the worker
count, nor where it runs (a worker's CPU, the GPU) or which decoder made the pixels. Training:
torchvision's RandomResizedCrop draw (`crop_boxes`) and a fair flip, from counter-based random numbers
of (seed, epoch, sample) (`uniforms`). Validation: the box that a resize of the short side to
res / resize_ratio followed by a centre res x res crop reads.
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
Box = tuple[float, float, float, float, bool]  # x0, y0, w, h (source pixels), flip

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

    def boxes(self, indices: Sequence[int] | Tensor, heights: Tensor, widths: Tensor) -> Tensor:
        """(B, 5) float64 rows (x0, y0, w, h, flip) of the samples `indices`, images of per-row size."""
        if not self.train:
            return torch.tensor([center_box(int(h), int(w), self.res, self.resize_ratio)
                                 for h, w in zip(heights.tolist(), widths.tolist())], dtype=torch.float64)
        u = uniforms(self.seed, self.epoch, indices, DRAWS)
        flip = (u[:, 2 * TRIES + 2] < 0.5).double()
        return torch.cat([crop_boxes(heights, widths, u, (self.scale_min, 1.0)), flip[:, None]], dim=1)

    def box(self, index: int, height: int, width: int) -> Box:
        """The box and flip of sample `index`, an image of height x width pixels."""
        x0, y0, w, h, flip = self.boxes([index], torch.tensor([height]), torch.tensor([width]))[0].tolist()
        return (x0, y0, w, h, flip > 0.5)
