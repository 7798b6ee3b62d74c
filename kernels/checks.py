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


def check_features(stu: Sequence[Tensor], tea_means: Sequence[Tensor]) -> list[Tensor]:
    """Stage lists of equal length; per stage a dense 4-D float student map (N, C, H, W) and the teacher's
    (N, C) float channel means on its device. Returns the means as contiguous fp32 (what the kernels read)."""
    if len(stu) != len(tea_means) or not stu:
        raise FastcdError(f"CD loss needs the teacher's means of every student stage, got {len(stu)} student "
                          f"maps and {len(tea_means)} teacher means")
    out = []
    for i, (s, m) in enumerate(zip(stu, tea_means, strict=True)):
        if s.dim() != 4 or s.dtype not in FLOAT_DTYPES:
            raise FastcdError(f"stu_feats[{i}] must be a 4-D (N, C, H, W) float32/float16/bfloat16 "
                              f"tensor, got shape {tuple(s.shape)} and {s.dtype}")
        if not (s.is_contiguous() or s.is_contiguous(memory_format=torch.channels_last)):
            raise FastcdError(f"stu_feats[{i}] (strides {s.stride()}) is neither NCHW-contiguous nor "
                              "channels_last; call .contiguous() on it")
        if s.numel() > MAX_NUMEL:
            raise FastcdError(f"stu_feats[{i}] has {s.numel()} elements; the kernels take at most "
                              f"{MAX_NUMEL} per map (split the batch)")
        if m.shape != s.shape[:2] or m.device != s.device or m.dtype not in FLOAT_DTYPES:
            raise FastcdError(f"stage {i}: the teacher's means must be (N, C) = {tuple(s.shape[:2])} float on "
                              f"{s.device}, got {tuple(m.shape)} {m.dtype} on {m.device}")
        out.append(m.float().contiguous())
    return out


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
