"""The distillation step, split into the phases a benchmark times separately:
teacher forward -> student (+connectors) forward -> losses -> backward -> optimizer step."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastcd.engine.runtime import Runtime
from fastcd.losses.registry import DistillLoss
from fastcd.models import DistillOutputs, NetOutput, teacher_forward


class DistillStep:
    """One training iteration of `model` (student + connectors) against an optional frozen `teacher`."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, losses: Sequence[DistillLoss],
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler, runtime: Runtime) -> None:
        self.model, self.teacher, self.losses = model, teacher, list(losses)
        self.optimizer, self.scheduler, self.scaler, self.rt = optimizer, scheduler, scaler, runtime
        self.with_connectors = any("conn_feats" in loss.inputs for loss in self.losses)
        self.weights = torch.ones(len(self.losses), device=runtime.device)

    def set_weights(self, weights: Sequence[float]) -> None:
        """The loss weights of the current epoch (from the loss-rate decay schedule)."""
        self.weights = torch.tensor(list(weights), device=self.rt.device, dtype=torch.float32)

    def teacher_outputs(self, images: Tensor) -> NetOutput | None:
        if self.teacher is None:
            return None
        with self.rt.autocast():
            return teacher_forward(self.teacher, images)

    def student_outputs(self, images: Tensor, labels: Tensor, tea: NetOutput | None) -> DistillOutputs:
        with self.rt.autocast():
            stu, conn = self.model(images, self.with_connectors)
        return DistillOutputs(labels=labels, stu_logits=stu.logits, stu_feats=stu.feats, stu_embed=stu.embed,
                              tea_logits=tea.logits if tea else None, tea_feats=tea.feats if tea else None,
                              tea_embed=tea.embed if tea else None, conn_feats=conn)

    def loss_terms(self, out: DistillOutputs) -> Tensor:
        """The unweighted losses as one fp32 vector (no host sync)."""
        with self.rt.autocast():
            terms = [loss(*[getattr(out, name) for name in loss.inputs]) for loss in self.losses]
        return torch.stack([t.float() for t in terms])

    def backward(self, terms: Tensor) -> Tensor:
        total = (terms * self.weights).sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        return total.detach()

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run all phases; return the student's logits (detached), the loss terms and the weighted total, all
        on the device. No stage map outlives the step: the outputs are dropped before the backward pass,
        which then frees each map as soon as its gradient no longer needs it."""
        out = self.student_outputs(images, labels, self.teacher_outputs(images))
        terms = self.loss_terms(out)
        logits = out.stu_logits.detach()
        del out
        total = self.backward(terms)
        self.optimizer_step()
        return logits, terms.detach(), total
