"""Knowledge distillation (the seed's `KDLoss`): KL(softmax(t/T) || softmax(s/T)) * T^2."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastcd.losses.registry import DistillLoss, register
from fastcd.utils.ranges import POSITIVE, check_range
from fastcd.utils.tensors import upcast


def kd_rows(stu_pred: Tensor, tea_pred: Tensor, T: float) -> Tensor:
    """Per-sample KL term (summed over classes, times T^2), computed in fp32 (fp64 for fp64 inputs)."""
    log_ps = F.log_softmax(upcast(stu_pred) / T, dim=1)
    log_pt = F.log_softmax(upcast(tea_pred) / T, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * (T * T)


@register("KDLoss")
class KDLoss(DistillLoss):
    """`KDLoss(T)(stu_pred, tea_pred)`: averaged over the batch."""

    def __init__(self, T: float = 1.0) -> None:
        super().__init__()
        check_range(T, POSITIVE, "KDLoss: T")
        self.T = T

    def forward(self, stu_pred: Tensor, tea_pred: Tensor) -> Tensor:
        return kd_rows(stu_pred, tea_pred, self.T).mean()
