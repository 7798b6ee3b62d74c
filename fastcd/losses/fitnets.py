"""FitNets hint loss (Romero et al., ICLR 2015): MSE between a connector's output and the teacher's stage."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from fastcd.errors import FastcdError
from fastcd.losses.registry import NUM_STAGES, DistillLoss, register
from fastcd.utils.tensors import upcast


@register("FitNetLoss")
class FitNetLoss(DistillLoss):
    """`FitNetLoss(stage)(conn_features, tea_features)`; `stage` is 1-based like the layer names (3 = layer3).

    The connector (conv1x1 -> BN -> ReLU, as CD's) plays the FitNets regressor; only the chosen stage's
    connector is built (unless another loss reads the others).
    """

    def __init__(self, stage: int = 3) -> None:
        super().__init__()
        if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= NUM_STAGES:
            raise FastcdError(f"FitNetLoss: stage must be an integer from 1 to {NUM_STAGES} "
                              f"(1-based, 3 = layer3), got {stage!r}")
        self.stage = stage

    def connector_stages(self) -> tuple[int, ...]:
        return (self.stage - 1,)

    def forward(self, conn_features: Sequence[Tensor], tea_features: Sequence[Tensor]) -> Tensor:
        s, t = conn_features[self.stage - 1], tea_features[self.stage - 1]
        if s.shape != t.shape:
            raise FastcdError(f"FitNetLoss: stage {self.stage} connector output {tuple(s.shape)} differs from "
                              f"the teacher's {tuple(t.shape)}; they need equal channels and spatial sizes")
        return F.mse_loss(upcast(s), upcast(t))
