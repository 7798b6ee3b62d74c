"""Batched augmentation and normalisation on the training device.

Each executes crops that `crops.CropPlan` drew: `resized_crop_affine` crops, resizes and flips a batch
of equal-sized images in one `grid_sample`; `resized_crops` does it for decoded images of different sizes
(one Triton launch on a GPU, `roi_align` elsewhere). `normalize` turns uint8 or float pixels (0-255) into
the model's input.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def resized_crop_affine(images: Tensor, boxes: Tensor, res: int) -> Tensor:
    """Crop each image of a float (N, C, H, W) batch to its box of `boxes` ((N, >= 5): x0, y0, w, h, flip),
    resize it to res x res and mirror it where flip is set, bilinearly, in one `grid_sample`."""
    n, _, height, width = images.shape
    x0, y0, w, h, flip = boxes[:, :5].double().unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / width * torch.where(flip > 0.5, -1.0, 1.0)
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    theta = theta.to(images.dtype)
    if images.is_cuda:  # a pageable host->device copy would wait for the stream: stage it in pinned memory
        theta = theta.pin_memory()
    theta = theta.to(images.device, non_blocking=True)
    grid = F.affine_grid(theta, [n, images.shape[1], res, res], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@functools.cache
def _scale_tensors(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """255*mean and 255*std as (1, C, 1, 1) device tensors, made once per device (not a copy per batch)."""
    def shaped(v: tuple[float, ...]) -> Tensor:
        return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).mul(255).to(device)

    return shaped(mean), shaped(std)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
              channels_last: bool) -> Tensor:
    """(x / 255 - mean) / std for an (N, C, H, W) batch of 0-255 pixels, in `dtype` and memory format."""
    m, s = _scale_tensors(tuple(mean), tuple(std), images.device)
    out = (images.float() - m) / s
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.to(dtype=dtype, memory_format=fmt)


def resized_crops_eager(images: Sequence[Tensor], meta: Tensor, res: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, 3, res, res) crops in 0-255 of (3, H_n, W_n) images: each box of `meta` (x0, y0, w, h in whole
    pixels, flip, ... per row) resized by `roi_align` (aligned, adaptive sampling grid) and mirrored where flip
    is set. Each box is cut out and edge-padded to a common size first, so a sample near the box's edge clamps
    to the box's edge pixels (as a crop then a resize does), never reading the pixels around the box."""
    boxes = meta[:, :4].round().long().tolist()
    cut = [im[:, y0:y0 + h, x0:x0 + w] for im, (x0, y0, w, h) in zip(images, boxes, strict=True)]
    hmax, wmax = max(c.shape[1] for c in cut), max(c.shape[2] for c in cut)
    padded = torch.stack([F.pad(c.to(dtype).unsqueeze(0), (0, wmax - c.shape[2], 0, hmax - c.shape[1]),
                                mode="replicate")[0] for c in cut])
    m = meta.to(dtype)
    zero = torch.zeros(len(images), dtype=dtype, device=m.device)
    rois = torch.stack([torch.arange(len(images), dtype=dtype, device=m.device), zero, zero, m[:, 2], m[:, 3]], dim=1)
    out = roi_align(padded, rois.to(padded.device), (res, res), 1.0, -1, aligned=True)
    flip = (m[:, 4] > 0.5).to(out.device).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


def resized_crops(images: Sequence[Tensor], meta: Tensor, res: int, mean: Sequence[float], std: Sequence[float],
                  dtype: torch.dtype, channels_last: bool) -> Tensor:
    """`resized_crops_eager` + `normalize` for the whole batch: fused in one Triton launch on a GPU."""
    if images[0].is_cuda:
        from fastcd.kernels.crop_triton import crop_resize_triton

        out = crop_resize_triton(images, meta, res, mean, std, dtype)
        return out if channels_last else out.contiguous()
    return normalize(resized_crops_eager(images, meta, res), mean, std, dtype, channels_last)
