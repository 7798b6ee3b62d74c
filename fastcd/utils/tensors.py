"""Dtype rules shared by the losses and the metrics."""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """At least fp32: bf16/fp16 are promoted, fp32 and fp64 stay as they are (never demoted)."""
    return torch.promote_types(x.dtype, torch.float32)


def upcast(x: Tensor) -> Tensor:
    """`x` in its `compute_dtype`."""
    return x.to(compute_dtype(x))


def channel_means(x: Tensor) -> Tensor:
    """The (N, C) spatial means of an (N, C, H, W) map, accumulated in its `compute_dtype` (no copy of it)."""
    return x.mean(dim=(2, 3), dtype=compute_dtype(x))
