"""Relational KD (Park et al., CVPR 2019): match the distance and angle structure of a batch's embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcd.losses.registry import DistillLoss, register
from fastcd.utils.ranges import NON_NEGATIVE, check_range
from fastcd.utils.tensors import upcast

EPS = 1e-12


def pair_differences(e: Tensor) -> Tensor:
    """N x D -> N x N x D, entry [i, j] = e_j - e_i (fp32, or fp64 for fp64 inputs)."""
    e = upcast(e).flatten(1)
    return e.unsqueeze(0) - e.unsqueeze(1)


def normalized_distances(diff: Tensor) -> Tensor:
    """N x N distances divided by their mean over the N(N-1) off-diagonal pairs (all 0 when N < 2)."""
    d = torch.linalg.vector_norm(diff, dim=2)
    n = d.shape[0]
    return d / (d.sum() / max(n * (n - 1), 1)).clamp_min(EPS)


def angle_cosines(diff: Tensor) -> Tensor:
    """N x N x N, entry [j, i, k] = cos of the angle e_i e_j e_k at vertex e_j (0 where an edge is empty).

    In fp32 even under autocast, which would otherwise run the batched product in bf16/fp16.
    """
    unit = F.normalize(diff, dim=2, eps=EPS)
    with torch.autocast(diff.device.type, enabled=False):
        return torch.bmm(unit, unit.transpose(1, 2))


@register("RKDLoss")
class RKDLoss(DistillLoss):
    """`RKDLoss(distance_weight, angle_weight)(stu_embed, tea_embed)` on the pooled penultimate embeddings.

    distance_weight * Huber(psi_D(s), psi_D(t)) + angle_weight * Huber(psi_A(s), psi_A(t)), each Huber
    (smooth L1, delta 1) averaged over all N^2 ordered pairs / N^3 ordered triplets like the official code;
    the paper's weights 25 and 50 are the defaults, so `loss_rate: 1` is the published objective. A batch
    of one or two samples gives 0 (there is no relation to transfer), never NaN.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        check_range(distance_weight, NON_NEGATIVE, "RKDLoss: distance_weight")
        check_range(angle_weight, NON_NEGATIVE, "RKDLoss: angle_weight")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, stu_embed: Tensor, tea_embed: Tensor) -> Tensor:
        ds, dt = pair_differences(stu_embed), pair_differences(tea_embed)
        loss = torch.zeros((), device=ds.device, dtype=ds.dtype)
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(normalized_distances(ds),
                                                                  normalized_distances(dt))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(angle_cosines(ds), angle_cosines(dt))
        return loss
