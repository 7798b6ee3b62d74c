"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match L2-normalised spatial attention maps."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcd.errors import FastcdError
from fastcd.losses.registry import DistillLoss, register
from fastcd.utils.tensors import compute_dtype, upcast


def attention_map(x: Tensor) -> Tensor:
    """N x C x H x W -> N x HW: the channel mean of x^2, flattened and L2-normalised per sample (fp32, or
    fp64 for fp64 inputs)."""
    return F.normalize(upcast(x).pow(2).mean(dim=1).flatten(1), dim=1)


def at_eager(stu_features: Sequence[Tensor], tea_features: Sequence[Tensor]) -> Tensor:
    """sum over stages of mean_{n,hw} (a(s) - a(t))^2, as the official code's `at_loss`."""
    total = torch.zeros((), device=stu_features[0].device, dtype=compute_dtype(stu_features[0]))
    for stage, (s, t) in enumerate(zip(stu_features, tea_features, strict=True), start=1):
        if s.shape[-2:] != t.shape[-2:]:
            raise FastcdError(
                f"ATLoss: stage {stage} attention maps differ in size: student {tuple(s.shape[-2:])}, "
                f"teacher {tuple(t.shape[-2:])}; AT needs equal spatial sizes (same stem and input resolution)")
        total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total


@register("ATLoss")
class ATLoss(DistillLoss):
    """`ATLoss()(stu_features, tea_features)` on the raw stage outputs (AT needs no connector).

    Use `loss_rate: 1000` (the official code's beta) to reproduce the published objective.
    """

    def forward(self, stu_features: Sequence[Tensor], tea_features: Sequence[Tensor]) -> Tensor:
        return at_eager(stu_features, tea_features)
