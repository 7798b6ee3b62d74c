"""Batched crop + resize + flip + normalise of decoded images of different sizes (Triton).

One launch for the whole batch: program (tile, n) writes BLOCK output pixels of image n, each the
average of a grid of bilinear samples inside its bin of the box (torchvision's `roi_align` with
`aligned=True` and the adaptive grid ceil(box / res), so a shrinking crop is area-filtered; each sample
clamped to the box's edge pixels, as a crop then a resize reads them: `transforms.resized_crops_eager`), mirrored
when the image's flip is set, normalised as (x - 255 mean) / (255 std), in the output dtype and in
channels_last memory order. The images are read in place where `decode_jpeg` left them (each (3, H, W)
contiguous, at its own address: the kernel gets each one's offset from the first), so nothing is
concatenated or padded to a common size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcd.kernels.checks import check_triton_device

BLOCK = 256  # output pixels per program


@triton.jit
def _crop_resize_kernel(
    Src_ptr,  # uint8: the first image of the batch (the base of every image's offset)
    Off_ptr,  # (N,) int64: where image n starts, in bytes from Src_ptr (any sign: separate allocations)
    Meta_ptr,  # (N, META) fp32: x0, y0, w, h, flip, H, W
    Out_ptr,  # (N, RES, RES, 3) out: the channels_last memory of (N, 3, RES, RES)
    res, meta_stride,
    sub0, sub1, sub2, mul0, mul1, mul2,  # per channel: 255 * mean and 1 / (255 * std)
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < res * res
    i = p // res
    j = p % res
    meta = Meta_ptr + n * meta_stride
    x0 = tl.load(meta)
    y0 = tl.load(meta + 1)
    box_w = tl.load(meta + 2)
    box_h = tl.load(meta + 3)
    bin_w = box_w / res
    bin_h = box_h / res
    flip = tl.load(meta + 4)
    h = tl.load(meta + 5).to(tl.int32)
    w = tl.load(meta + 6).to(tl.int32)
    src = Src_ptr + tl.load(Off_ptr + n)
    plane = h * w
    # roi_align's adaptive sampling grid: ceil(bin) samples per axis, at least one
    grid_h = bin_h.to(tl.int32)
    grid_h = tl.maximum(grid_h + (grid_h.to(tl.float32) < bin_h).to(tl.int32), 1)
    grid_w = bin_w.to(tl.int32)
    grid_w = tl.maximum(grid_w + (grid_w.to(tl.float32) < bin_w).to(tl.int32), 1)
    col = tl.where(flip > 0.5, res - 1 - j, j).to(tl.float32)
    top = y0 - 0.5 + i.to(tl.float32) * bin_h  # pixel centres at integer coordinates
    left = x0 - 0.5 + col * bin_w
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    y_end = y0 + box_h - 1.0  # the box's last row and column (whole pixels): samples clamp to the box
    x_end = x0 + box_w - 1.0
    for gy in range(0, grid_h):
        y = tl.minimum(tl.maximum(top + (gy + 0.5) * bin_h / grid_h, y0), y_end)
        y_lo = y.to(tl.int32)
        y_hi = tl.minimum(y_lo + 1, y_end.to(tl.int32))
        ly = y - y_lo.to(tl.float32)
        for gx in range(0, grid_w):
            x = tl.minimum(tl.maximum(left + (gx + 0.5) * bin_w / grid_w, x0), x_end)
            x_lo = x.to(tl.int32)
            x_hi = tl.minimum(x_lo + 1, x_end.to(tl.int32))
            lx = x - x_lo.to(tl.float32)
            w00 = (1.0 - ly) * (1.0 - lx)
            w01 = (1.0 - ly) * lx
            w10 = ly * (1.0 - lx)
            w11 = ly * lx
            a = y_lo * w + x_lo
            b = y_lo * w + x_hi
            c = y_hi * w + x_lo
            d = y_hi * w + x_hi
            for ch in tl.static_range(3):
                base = src + ch * plane
                v = (w00 * tl.load(base + a, mask=mask, other=0).to(tl.float32)
                     + w01 * tl.load(base + b, mask=mask, other=0).to(tl.float32)
                     + w10 * tl.load(base + c, mask=mask, other=0).to(tl.float32)
                     + w11 * tl.load(base + d, mask=mask, other=0).to(tl.float32))
                if ch == 0:
                    acc0 += v
                elif ch == 1:
                    acc1 += v
                else:
                    acc2 += v
    inv = 1.0 / (grid_h * grid_w).to(tl.float32)
    out = Out_ptr + (n * res * res + p) * 3
    dtype = Out_ptr.dtype.element_ty
    tl.store(out, ((acc0 * inv - sub0) * mul0).to(dtype), mask=mask)
    tl.store(out + 1, ((acc1 * inv - sub1) * mul1).to(dtype), mask=mask)
    tl.store(out + 2, ((acc2 * inv - sub2) * mul2).to(dtype), mask=mask)


def crop_resize_triton(images: Sequence[Tensor], meta: Tensor, res: int, mean: Sequence[float],
                       std: Sequence[float], dtype: torch.dtype) -> Tensor:
    """(N, 3, res, res) channels_last `dtype` crops of `images` ((3, H_n, W_n) uint8 each, contiguous, on
    one device; read in place, not copied together); `meta` is (N, >= 7) fp32 on their device: x0, y0, w, h
    (source pixels), flip, H, W (`crops.ROW`)."""
    first = images[0]
    check_triton_device(first, "images[0]")
    n = len(images)
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or not im.is_contiguous() or im.device != first.device:
            raise ValueError(f"images[{i}] is not a contiguous uint8 image on {first.device}")
    # each image's place as an offset from the first one's (the kernel's base pointer), one small copy
    offsets = torch.tensor([im.data_ptr() - first.data_ptr() for im in images], dtype=torch.int64)
    if first.is_cuda:
        offsets = offsets.pin_memory()
    offsets = offsets.to(first.device, non_blocking=True)
    out = torch.empty((n, res, res, 3), dtype=dtype, device=first.device)
    sub = [255.0 * m for m in mean]
    mul = [1.0 / (255.0 * s) for s in std]
    _crop_resize_kernel[(triton.cdiv(res * res, BLOCK), n)](
        first, offsets, meta, out, res, meta.stride(0), *sub, *mul, BLOCK=BLOCK)
    return out.permute(0, 3, 1, 2)
