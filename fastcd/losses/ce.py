"""Cross-entropy of the student's logits and the labels (the seed's `CELoss`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastcd.losses.registry import DistillLoss, register
from fastcd.utils.ranges import FRACTION, check_range
from fastcd.utils.tensors import upcast


@register("CELoss")
class CELoss(DistillLoss):
    """`CELoss()(stu_pred, label)`; optional label smoothing applies to this term only."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_range(label_smoothing, FRACTION, "CELoss: label_smoothing")
        self.label_smoothing = label_smoothing

    def forward(self, stu_pred: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(upcast(stu_pred), label, label_smoothing=self.label_smoothing)
