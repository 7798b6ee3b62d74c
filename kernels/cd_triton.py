"""Fused Channel Distillation loss (Triton), from the student's maps and the teacher's channel means.

Forward, one launch per stage and one pass over each student map: d[n, c] = mean_hw(s) - m[n, c] in
fp32 (m: the teacher's per-channel spatial means, from its maps or a teacher-target cache), and per
program sum_c d^2 / (N*C); the loss is the sum of those partials. Only the N x C differences are saved.
Backward, no kernel: the differences expanded over H x W (`cd_function`). The teacher gets no gradient.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcd.kernels.cd_function import CDFunction
from fastcd.kernels.checks import (
    Alloc,
    check_features,
    check_no_teacher_grad,
    check_triton_device,
    hw_strides,
    is_channels_last,
)

TILE = 2048  # elements per tensor per loop step


@triton.jit
def _cd_forward_kernel(
    S_ptr, S_stride_n, S_stride_c, S_stride_hw,  # student map (N, C, H*W), any dense layout
    M_ptr,  # (N, C) fp32, contiguous: the teacher's channel means
    D_ptr,  # (N, C) fp32 out: mean_hw(s) - m
    Partial_ptr,  # (num_programs,) fp32 out: sum over this program's channels of d^2 / (N*C)
    C, HW, inv_hw, inv_nc,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BLOCK_C)
    n = pid // num_cb
    c = (pid % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    s_base = S_ptr + n * S_stride_n + c[:, None] * S_stride_c  # [BLOCK_C, 1]
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw[None, :] < HW)  # [BLOCK_C, BLOCK_HW]
        acc += tl.load(s_base + hw[None, :] * S_stride_hw, mask=mask, other=0.0).to(tl.float32)
    d = tl.sum(acc, axis=1) * inv_hw - tl.load(M_ptr + n * C + c, mask=c_mask, other=0.0)  # [BLOCK_C]
    tl.store(D_ptr + n * C + c, d, mask=c_mask)
    tl.store(Partial_ptr + pid, tl.sum(d * d, axis=0) * inv_nc)


def forward_blocks(x: Tensor, wanted: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): along the contiguous axis first, so loads coalesce in either layout."""
    n, c, h, w = x.shape
    if is_channels_last(x):
        block_c = min(triton.next_power_of_2(c), 64)
        while block_c > 16 and n * triton.cdiv(c, block_c) < wanted:
            block_c //= 2  # more programs for small batches; 16 channels still fill 32-byte sectors
        return block_c, max(1, min(triton.next_power_of_2(h * w), TILE // block_c))
    block_hw = min(triton.next_power_of_2(h * w), TILE // 2)
    return max(1, min(triton.next_power_of_2(c), TILE // block_hw)), block_hw


@functools.cache
def programs_wanted(device: torch.device) -> int:
    """About four programs per SM keep enough loads in flight."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def cd_forward(stu: Sequence[Tensor], tea_means: Sequence[Tensor], alloc: Alloc = torch.empty,
               blocks: tuple[int, int] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Loss (fp32 scalar) and the per-stage (N, C) fp32 differences; `alloc` makes the outputs."""
    tea = check_features(stu, tea_means)
    check_triton_device(stu[0], "stu_feats[0]")
    device = stu[0].device
    wanted = programs_wanted(device)
    plans = []
    for s in stu:
        block_c, block_hw = blocks or forward_blocks(s, wanted)
        plans.append((block_c, block_hw, s.shape[0] * triton.cdiv(s.shape[1], block_c)))
    partials = alloc((sum(p[2] for p in plans),), dtype=torch.float32, device=device)
    diffs, offset = [], 0
    for s, t, (block_c, block_hw, grid) in zip(stu, tea, plans, strict=True):
        n, c, h, w = s.shape
        d = alloc((n, c), dtype=torch.float32, device=device)
        _cd_forward_kernel[(grid,)](
            s, *hw_strides(s), t, d, partials[offset:offset + grid],
            c, h * w, 1.0 / (h * w), 1.0 / (n * c), BLOCK_C=block_c, BLOCK_HW=block_hw)
        diffs.append(d)
        offset += grid
    return partials.sum(), diffs


def cd_triton(stu: Sequence[Tensor], tea_means: Sequence[Tensor]) -> Tensor:
    """sum_i mean_{n,c} (mean_hw s_i - m_i)^2 from the teacher's channel means m_i, fused; gradients flow to
    the student maps only."""
    check_features(stu, tea_means)
    check_no_teacher_grad(tea_means)
    return CDFunction.apply(cd_forward, *stu, *tea_means)
