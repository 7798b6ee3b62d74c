"""Fused guided-KD loss (Triton; the seed's `KDLossv2`).

Forward, one program per row: online max/sum over class blocks of s/T and t/T (fp32), the
teacher argmax (first maximal index, like torch.argmax) compared with the label, the KL row
sum T^2 * sum_k pt_k (log pt_k - log ps_k), and, in a second sweep over the same row, the
unscaled student gradient mask * T * (softmax(s/T) - softmax(t/T)). The loss is
sum(mask * kl) / max(count, 1): 0 with a zero gradient when no row qualifies, with no host sync.
Backward, one launch: grad_s = G * grad_out / max(count, 1). The teacher gets no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcd.kernels.checks import Alloc, check_logits, check_no_teacher_grad, check_triton_device

MAX_BLOCK_K = 1024
BACKWARD_BLOCK = 1024


@triton.jit
def _gkd_forward_kernel(
    S_ptr, S_stride,  # (B, K) student logits, unit class stride
    T_ptr, T_stride,  # (B, K) teacher logits
    Label_ptr,  # (B,) integer labels
    G_ptr,  # (B, K) fp32 out, contiguous: mask * T * (softmax(s/T) - softmax(t/T))
    Rows_ptr,  # (2, B) fp32 out: [mask * T^2 * KL row sum, mask]
    B, K, temp, inv_temp,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    s_row = S_ptr + row * S_stride
    t_row = T_ptr + row * T_stride
    cols = tl.arange(0, BLOCK_K)
    zero = tl.sum(tl.zeros([BLOCK_K], dtype=tl.float32), axis=0)
    m_s = zero - float("inf")  # running max of s/T
    l_s = zero  # running sum of exp(s/T - m_s)
    m_t = zero - float("inf")
    l_t = zero
    a_t = zero  # running sum of exp(t/T - m_t) * (t/T - s/T)
    best = zero - float("inf")  # teacher argmax so far (on t itself: the same as on t/T)
    best_idx = tl.sum(tl.zeros([BLOCK_K], dtype=tl.int32), axis=0)
    for start in range(0, K, BLOCK_K):
        k = start + cols
        k_mask = k < K
        t = tl.load(t_row + k, mask=k_mask, other=-float("inf")).to(tl.float32)
        s = tl.load(s_row + k, mask=k_mask, other=-float("inf")).to(tl.float32)
        blk_best = tl.max(t, axis=0)
        blk_idx = tl.argmax(t, axis=0, tie_break_left=True)
        better = blk_best > best  # strict: an earlier block keeps a tie
        best_idx = tl.where(better, start + blk_idx, best_idx)
        best = tl.where(better, blk_best, best)
        zs = s * inv_temp
        zt = t * inv_temp
        new_m_s = tl.maximum(m_s, tl.max(zs, axis=0))
        l_s = l_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(zs - new_m_s), axis=0)
        m_s = new_m_s
        new_m_t = tl.maximum(m_t, tl.max(zt, axis=0))
        e_t = tl.exp(zt - new_m_t)
        alpha = tl.exp(m_t - new_m_t)
        l_t = l_t * alpha + tl.sum(e_t, axis=0)
        diff = tl.where(k_mask, zt, 0.0) - tl.where(k_mask, zs, 0.0)  # no inf - inf in the padding
        a_t = a_t * alpha + tl.sum(e_t * diff, axis=0)
        m_t = new_m_t
    hit = best_idx == tl.load(Label_ptr + row).to(tl.int32)
    # sum_k pt_k (zt_k - zs_k) - lse_t + lse_s, ordered so that equal rows give exactly 0
    kl = (a_t / l_t - (m_t - m_s)) + tl.log(l_s / l_t)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    tl.store(Rows_ptr + row, tl.where(hit, kl * temp * temp, 0.0))
    tl.store(Rows_ptr + B + row, hit.to(tl.float32))
    scale = tl.where(hit, temp, 0.0)
    for start in range(0, K, BLOCK_K):
        k = start + cols
        k_mask = k < K
        s = tl.load(s_row + k, mask=k_mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + k, mask=k_mask, other=0.0).to(tl.float32)
        g = tl.exp(s * inv_temp - lse_s) - tl.exp(t * inv_temp - lse_t)
        tl.store(G_ptr + row * K + k, g * scale, mask=k_mask)


@triton.jit
def _gkd_backward_kernel(
    G_ptr,  # (B*K,) fp32 unscaled gradient from the forward
    GradOut_ptr,  # () incoming gradient
    Count_ptr,  # () number of rows in the mask
    Grad_ptr,  # (B*K,) out, the student's dtype
    numel,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    scale = tl.load(GradOut_ptr).to(tl.float32) / tl.maximum(tl.load(Count_ptr), 1.0)
    g = tl.load(G_ptr + i, mask=mask, other=0.0)
    tl.store(Grad_ptr + i, (g * scale).to(Grad_ptr.dtype.element_ty), mask=mask)


def gkd_forward(stu: Tensor, tea: Tensor, labels: Tensor, T: float, alloc: Alloc = torch.empty,
                block_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, count, G): fp32 scalar loss, fp32 scalar count, (B, K) fp32 unscaled student gradient."""
    check_logits(stu, tea, labels, T)
    check_triton_device(stu, "stu_logits")
    b, k = stu.shape
    grad = alloc((b, k), dtype=torch.float32, device=stu.device)
    rows = alloc((2, b), dtype=torch.float32, device=stu.device)
    block_k = block_k or min(triton.next_power_of_2(k), MAX_BLOCK_K)
    _gkd_forward_kernel[(b,)](stu, stu.stride(0), tea, tea.stride(0), labels, grad, rows,
                              b, k, float(T), 1.0 / T, BLOCK_K=block_k)
    sums = rows.sum(dim=1)
    return sums[0] / sums[1].clamp_min(1.0), sums[1], grad


def gkd_backward(grad: Tensor, count: Tensor, grad_out: Tensor, dtype: torch.dtype,
                 alloc: Alloc = torch.empty, block: int = BACKWARD_BLOCK) -> Tensor:
    """Student gradient G * grad_out / max(count, 1) in `dtype`."""
    out = alloc(grad.shape, dtype=dtype, device=grad.device)
    numel = grad.numel()
    _gkd_backward_kernel[(triton.cdiv(numel, block),)](grad, grad_out, count, out, numel, BLOCK=block)
    return out


class GKDTritonFunction(torch.autograd.Function):
    """Inputs: student logits, teacher logits, labels, T; output: the fp32 loss."""

    @staticmethod
    def forward(ctx, stu: Tensor, tea: Tensor, labels: Tensor, T: float) -> Tensor:
        loss, count, grad = gkd_forward(stu, tea, labels, T)
        ctx.save_for_backward(grad, count)
        ctx.dtype = stu.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad, count = ctx.saved_tensors
        stu_grad = gkd_backward(grad, count, grad_out.contiguous(), ctx.dtype) if ctx.needs_input_grad[0] else None
        return stu_grad, None, None, None


def gkd_triton(stu: Tensor, tea: Tensor, labels: Tensor, T: float) -> Tensor:
    """Guided KD, fused; the gradient flows to the student logits only."""
    check_no_teacher_grad([tea])
    return GKDTritonFunction.apply(stu, tea, labels, T)
