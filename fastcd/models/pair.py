"""The distillation pair: a trainable student with a connector per stage the losses read, and a frozen teacher."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastcd.models.resnet import FeatureResNet, NetOutput
from fastcd.utils.tensors import channel_means


def connector(c_in: int, c_out: int) -> nn.Sequential:
    """conv1x1 (no bias) -> BatchNorm2d -> ReLU, mapping student channels to teacher channels."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class StudentWithConnectors(nn.Module):
    """What the optimizer trains (and DDP wraps): the student and the connectors of `stages` (0-based stage
    indices: those some loss reads), mapping its stage channels to the teacher's."""

    def __init__(self, student: FeatureResNet, teacher_channels: list[int] | None,
                 stages: Sequence[int] = ()) -> None:
        super().__init__()
        self.student = student
        if stages and teacher_channels is None:
            raise ValueError("connectors need the teacher's stage channels")
        self.connectors = nn.ModuleDict({str(i): connector(student.stage_channels[i], teacher_channels[i])
                                         for i in sorted(stages)})

    def forward(self, images: Tensor) -> tuple[NetOutput, list[Tensor | None] | None]:
        """The student's outputs and one connector output per stage (None where no loss reads it), or None
        without connectors."""
        out = self.student(images)
        if not self.connectors:
            return out, None
        conn = [self.connectors[str(i)](f) if str(i) in self.connectors else None for i, f in enumerate(out.feats)]
        return out, conn


@dataclass
class TeacherTargets:
    """What the losses may read of the teacher for one batch: its stage maps (a live teacher only), their
    (N, C) fp32 channel means (CD), its logits (KD, GKD) and pooled embedding (RKD); None where absent."""

    feats: list[Tensor] | None = None
    means: list[Tensor] | None = None
    logits: Tensor | None = None
    embed: Tensor | None = None


@dataclass
class DistillOutputs:
    """Everything a loss may ask for by name (see `fastcd.losses.registry.INPUT_NAMES`)."""

    labels: Tensor
    stu_logits: Tensor
    stu_feats: list[Tensor]
    stu_embed: Tensor
    tea_logits: Tensor | None = None
    tea_feats: list[Tensor] | None = None
    tea_means: list[Tensor] | None = None  # (N, C) per stage, fp32: what CD reads
    tea_embed: Tensor | None = None
    conn_feats: list[Tensor | None] | None = None


def freeze(teacher: FeatureResNet, bn_mode: str) -> FeatureResNet:
    """No gradients for the teacher; BatchNorm in eval mode, or batch statistics (`train`) as the original."""
    teacher.requires_grad_(False)
    teacher.train(bn_mode == "train")
    return teacher


def teacher_targets(teacher: FeatureResNet, images: Tensor, means: bool, feats: bool) -> TeacherTargets:
    """The teacher's logits and embedding, without building a graph; with `means`, its stage maps' channel
    means; with `feats`, the maps themselves (otherwise none outlives this call)."""
    with torch.no_grad():
        out = teacher(images)
        return TeacherTargets(out.feats if feats else None,
                              [channel_means(f) for f in out.feats] if means else None, out.logits, out.embed)
