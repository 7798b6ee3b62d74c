"""Input checks shared by the kernel launchers: every bad input is a FastcdError naming the fix."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastcd.errors import FastcdError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = 2**31 - 1  # kernels index with int32
Alloc = Callable[..., Tensor]  # torch.empty, or a poisoning allocator in the tests


def check_triton_device(x: Tensor, what: str) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise FastcdError(f"{what} is on {x.device}; the Triton kernels need CUDA tensors "
                          "(or TRITON_INTERPRET=1 for CPU), or use impl='eager'")


def is_channels_last(x: Tensor) -> bool:
    """True for a channels_last map that is not also NCHW-contiguous (1x1 maps count as NCHW)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def hw_strides(x: Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_hw) of a dense NCHW or channels_last map, with H and W merged."""
    sn, sc, sh, sw = x.stride()
    return sn, sc, (sw if x.shape[3] > 1 else sh)


def check_features(stu: Sequence[Tensor], tea: Sequence[Tensor]) -> None:
    """Stage lists of equal length; per stage, 4-D float maps of one shape and device, each dense."""
    if len(stu) != len(tea) or not stu:
        raise FastcdError(f"CD loss needs one teacher map per student map, got {len(stu)} student "
                          f"and {len(tea)} teacher maps")
    for i, (s, t) in enumerate(zip(stu, tea, strict=True)):
        for side, x in (("stu_feats", s), ("tea_feats", t)):
            if x.dim() != 4 or x.dtype not in FLOAT_DTYPES:
                raise FastcdError(f"{side}[{i}] must be a 4-D (N, C, H, W) float32/float16/bfloat16 "
                                  f"tensor, got shape {tuple(x.shape)} and {x.dtype}")
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                raise FastcdError(f"{side}[{i}] (strides {x.stride()}) is neither NCHW-contiguous nor "
                                  "channels_last; call .contiguous() on it")
            if x.numel() > MAX_NUMEL:
                raise FastcdError(f"{side}[{i}] has {x.numel()} elements; the kernels take at most "
                                  f"{MAX_NUMEL} per map (split the batch)")
        if s.shape != t.shape or s.device != t.device:
            raise FastcdError(f"stage {i}: student map {tuple(s.shape)} on {s.device} does not match "
                              f"teacher map {tuple(t.shape)} on {t.device}")


def check_logits(stu: Tensor, tea: Tensor, labels: Tensor, T: float) -> None:
    """(B, K) float logits of one shape with unit class stride, (B,) integer labels, T > 0."""
    for side, x in (("stu_logits", stu), ("tea_logits", tea)):
        if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
            raise FastcdError(f"{side} must be a 2-D (B, K) float32/float16/bfloat16 tensor, "
                              f"got shape {tuple(x.shape)} and {x.dtype}")
        if x.stride(1) != 1 and x.shape[1] > 1:
            raise FastcdError(f"{side} (strides {x.stride()}) must have contiguous classes; "
                              "call .contiguous() on it")
        if x.numel() > MAX_NUMEL:
            raise FastcdError(f"{side} has {x.numel()} elements; the kernel takes at most {MAX_NUMEL}")
    if stu.shape != tea.shape or stu.device != tea.device or stu.shape[1] < 1:
        raise FastcdError(f"student logits {tuple(stu.shape)} on {stu.device} do not match teacher "
                          f"logits {tuple(tea.shape)} on {tea.device} (need equal (B, K), K >= 1)")
    if labels.shape != stu.shape[:1] or labels.dtype.is_floating_point or labels.device != stu.device:
        raise FastcdError(f"labels must be an integer tensor of shape ({stu.shape[0]},) on {stu.device}, "
                          f"got {labels.dtype} {tuple(labels.shape)} on {labels.device}")
    if not T > 0:
        raise FastcdError(f"temperature T must be > 0, got {T}")


def check_no_teacher_grad(tea: Sequence[Tensor]) -> None:
    """The fused kernels give the frozen teacher no gradient; refuse rather than drop one silently."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tea):
        raise FastcdError("the fused kernels give no gradient to the teacher's tensors, which require "
                          "grad here; detach them (the teacher is frozen) or use impl='eager'")
