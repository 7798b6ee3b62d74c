"""Batched augmentation and normalisation on the training device.

`random_resized_crop` draws torchvision's RandomResizedCrop boxes (scale, log-uniform ratio, 10 tries,
then a centre crop) for a whole batch and applies crop + resize + horizontal flip in one
`grid_sample`; `center_crop` resizes the short side to res/ratio and crops the centre; `normalize`
turns uint8 or float pixels (0-255) into the model's input. `resized_crops` executes given boxes on a
batch of decoded images of different sizes: one Triton launch on a GPU, `roi_align` elsewhere.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range

def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator, tries: int = 10) -> Tensor:
    """(n, 4) boxes (x0, y0, w, h) in pixels, drawn as torchvision's RandomResizedCrop draws them."""
    area = height * width
    s = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator) * area
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    w = (s * r).sqrt().round()
    h = (s / r).sqrt().round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w_sel, h_sel = w[rows, first.clamp_min(0)], h[rows, first.clamp_min(0)]
    # Fallback: the whole image clamped to the ratio range, centred.
    in_ratio = width / height
    fb_w = float(width) if ratio[0] <= in_ratio <= ratio[1] else (
        round(height * ratio[0]) if in_ratio < ratio[0] else round(height * ratio[1]))
    fb_w = min(fb_w, width)
    fb_h = float(height) if ratio[0] <= in_ratio <= ratio[1] else (
        round(fb_w / ratio[0]) if in_ratio < ratio[0] else float(height))
    fb_h = min(fb_h, height)
    bad = first < 0
    w_sel = torch.where(bad, torch.full_like(w_sel, fb_w), w_sel)
    h_sel = torch.where(bad, torch.full_like(h_sel, fb_h), h_sel)
    x0 = (torch.rand(n, generator=generator) * (width - w_sel + 1)).floor()
    y0 = (torch.rand(n, generator=generator) * (height - h_sel + 1)).floor()
    x0 = torch.where(bad, (width - w_sel) // 2, x0)
    y0 = torch.where(bad, (height - h_sel) // 2, y0)
    return torch.stack([x0, y0, w_sel, h_sel], dim=1)


def random_resized_crop(images: Tensor, res: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = RATIO, flip: bool = True) -> Tensor:
    """Crop, resize to res x res and flip (p=0.5) each image of a float (N, C, H, W) batch, bilinearly."""
    n, _, height, width = images.shape
    boxes = crop_boxes(n, height, width, scale, ratio, generator)
    x0, y0, w, h = boxes.unbind(1)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w / width * sign
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    if images.is_cuda:  # a pageable host->device copy would wait for the stream: stage it in pinned memory
        theta = theta.pin_memory()
    theta = theta.to(images.device, images.dtype, non_blocking=True)
    grid = F.affine_grid(theta, [n, images.shape[1], res, res], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(images: Tensor, res: int, resize_ratio: float) -> Tensor:
    """Resize the short side to round(res / resize_ratio) (antialiased) and crop the centre res x res."""
    _, _, height, width = images.shape
    short = round(res / resize_ratio)
    if min(height, width) != short:
        scale = short / min(height, width)
        size = (max(short, round(height * scale)), max(short, round(width * scale)))
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top = (images.shape[2] - res) // 2
    left = (images.shape[3] - res) // 2
    return images[:, :, top:top + res, left:left + res]


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
    """(N, 3, res, res) crops in 0-255 of (3, H_n, W_n) images: each box of `meta` (x0, y0, w, h, flip,
    ... per row) resized by `roi_align` (aligned, adaptive sampling grid) and mirrored where flip is set.
    Images are edge-padded to a common size, so sampling near a border clamps to the image, not the pad."""
    hmax, wmax = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    padded = torch.stack([F.pad(im.to(dtype).unsqueeze(0), (0, wmax - im.shape[2], 0, hmax - im.shape[1]),
                                mode="replicate")[0] for im in images])
    m = meta.to(dtype)
    rois = torch.stack([torch.arange(len(images), dtype=dtype, device=m.device), m[:, 0], m[:, 1],
                        m[:, 0] + m[:, 2], m[:, 1] + m[:, 3]], dim=1)
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
