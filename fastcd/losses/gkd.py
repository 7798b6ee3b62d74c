"""Guided KD (the seed's `KDLossv2`): the KD term over the samples the teacher gets right."""
from __future__ import annotations

from torch import Tensor

from fastcd.kernels.dispatch import check_impl
from fastcd.losses.kd import kd_rows
from fastcd.losses.registry import DistillLoss, fused_impl, register
from fastcd.utils.ranges import POSITIVE, check_range

IMPLS = ("auto", "triton", "eager")  # no CUDA C++ version of this one


def gkd_eager(stu_pred: Tensor, tea_pred: Tensor, label: Tensor, T: float) -> Tensor:
    """Sum of the KD rows where argmax(teacher) == label, / their count; 0 when none (no host sync)."""
    mask = (tea_pred.argmax(dim=1) == label).float()
    return (kd_rows(stu_pred, tea_pred, T) * mask).sum() / mask.sum().clamp_min(1.0)


@register("KDLossv2")
class KDLossv2(DistillLoss):
    """`KDLossv2(T)(stu_pred, tea_pred, label)`.

    `impl`: auto (the Triton kernel on CUDA fp32/bf16/fp16 tensors, eager elsewhere), triton or eager. The fused
    kernel gives the (frozen) teacher no gradient.
    """

    def __init__(self, T: float = 1.0, impl: str = "auto") -> None:
        super().__init__()
        check_impl(impl, "KDLossv2", IMPLS)
        check_range(T, POSITIVE, "KDLossv2: T")
        self.T = T
        self.impl = impl

    def forward(self, stu_pred: Tensor, tea_pred: Tensor, label: Tensor) -> Tensor:
        if fused_impl(self.impl, stu_pred) == "triton":
            from fastcd.kernels.gkd_triton import gkd_triton

            return gkd_triton(stu_pred, tea_pred, label, self.T)
        return gkd_eager(stu_pred, tea_pred, label, self.T)
