"""The distillation pair: a trainable student with one connector per stage, and a frozen teacher."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastcd.models.resnet import FeatureResNet, NetOutput


def connector(c_in: int, c_out: int) -> nn.Sequential:
    """conv1x1 (no bias) -> BatchNorm2d -> ReLU, mapping student channels to teacher channels."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class StudentWithConnectors(nn.Module):
    """What the optimizer trains (and DDP wraps): the student and, with a teacher, its connectors."""

    def __init__(self, student: FeatureResNet, teacher_channels: list[int] | None) -> None:
        super().__init__()
        self.student = student
        pairs = zip(student.stage_channels, teacher_channels or [], strict=teacher_channels is not None)
        self.connectors = nn.ModuleList(connector(cs, ct) for cs, ct in pairs)

    def forward(self, images: Tensor, with_connectors: bool) -> tuple[NetOutput, list[Tensor] | None]:
        out = self.student(images)
        conn = [c(f) for c, f in zip(self.connectors, out.feats)] if with_connectors else None
        return out, conn


@dataclass
class DistillOutputs:
    """Everything a loss may ask for by name (see `fastcd.losses.registry.INPUT_NAMES`)."""

    labels: Tensor
    stu_logits: Tensor
    stu_feats: list[Tensor]
    stu_embed: Tensor
    tea_logits: Tensor | None = None
    tea_feats: list[Tensor] | None = None
    tea_embed: Tensor | None = None
    conn_feats: list[Tensor] | None = None


def freeze(teacher: FeatureResNet, bn_mode: str) -> FeatureResNet:
    """No gradients for the teacher; BatchNorm in eval mode, or batch statistics (`train`) as the original."""
    teacher.requires_grad_(False)
    teacher.train(bn_mode == "train")
    return teacher


def teacher_forward(teacher: FeatureResNet, images: Tensor) -> NetOutput:
    """The teacher's outputs, without building a graph."""
    with torch.no_grad():
        return teacher(images)
