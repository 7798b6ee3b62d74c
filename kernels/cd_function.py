"""The autograd Function of the fused CD loss, shared by its Triton and CUDA C++ forward kernels.

Forward: a kernel's `forward(stu_maps, tea_means) -> (loss, diffs)` with the K (N, C) fp32 differences
d = mean_hw(s) - m. Backward, no kernel: d(loss)/d(s[n, c, h, w]) = grad_out * 2 d[n, c] /
(N*C*H*W) at every pixel, the differences expanded over H x W, so no full map is written. The teacher's
means get no gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Forward = Callable[[Sequence[Tensor], Sequence[Tensor]], tuple[Tensor, list[Tensor]]]


class CDFunction(torch.autograd.Function):
    """`CDFunction.apply(forward, *student_maps, *teacher_means)` -> the fp32 loss."""

    @staticmethod
    def forward(ctx, forward: Forward, *maps: Tensor) -> Tensor:
        k = len(maps) // 2
        loss, diffs = forward(maps[:k], maps[k:])
        ctx.save_for_backward(*diffs)
        ctx.like = [(s.shape, s.dtype) for s in maps[:k]]
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        k = len(ctx.like)
        grads: list[Tensor | None] = [None] * (1 + 2 * k)  # the forward function, K student maps, K means
        for i, (shape, dtype) in enumerate(ctx.like):
            if ctx.needs_input_grad[1 + i]:
                n, c, h, w = shape
                scaled = ctx.saved_tensors[i] * (grad_out.float() * (2.0 / (n * c * h * w)))
                grads[1 + i] = scaled.to(dtype)[:, :, None, None].expand(n, c, h, w)
        return tuple(grads)
