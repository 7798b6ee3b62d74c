"""The distillation step, in named phases (`PHASES`) that training runs and a benchmark times:
teacher forward -> student (+connectors) forward -> losses -> backward -> optimizer step."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastcd.engine.runtime import Runtime
from fastcd.losses.registry import DistillLoss
from fastcd.models import DistillOutputs, TeacherTargets, teacher_targets

PHASES = ("teacher", "student_fwd", "losses", "backward", "optimizer")  # what `DistillStep.run` marks, in order


def _no_mark() -> None:
    return None


class DistillStep:
    """One training iteration of `model` (student + connectors) against an optional frozen `teacher`."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, losses: Sequence[DistillLoss],
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler, runtime: Runtime) -> None:
        self.model, self.teacher, self.losses = model, teacher, list(losses)
        self.optimizer, self.scheduler, self.scaler, self.rt = optimizer, scheduler, scaler, runtime
        self.reads_means = any("tea_means" in loss.inputs for loss in self.losses)
        self.reads_maps = any("tea_feats" in loss.inputs for loss in self.losses)  # AT, FitNets
        self.weights = torch.ones(len(self.losses), device=runtime.device)

    def set_weights(self, weights: Sequence[float]) -> None:
        """The loss weights of the current epoch (from the loss-rate decay schedule)."""
        self.weights = torch.tensor(list(weights), device=self.rt.device, dtype=torch.float32)

    def teacher_outputs(self, images: Tensor, cached: TeacherTargets | None = None) -> TeacherTargets | None:
        """Phase "teacher": what the losses read of the frozen teacher (no graph), or the `cached` targets of
        this batch (a teacher-target cache: no teacher runs)."""
        if cached is not None or self.teacher is None:
            return cached
        with self.rt.autocast():
            return teacher_targets(self.teacher, images, self.reads_means, self.reads_maps)

    def student_outputs(self, images: Tensor, labels: Tensor, tea: TeacherTargets | None) -> DistillOutputs:
        """Phase "student_fwd": the student and its connectors, with everything a loss may read."""
        with self.rt.autocast():
            stu, conn = self.model(images)
        tea = tea or TeacherTargets()
        return DistillOutputs(labels=labels, stu_logits=stu.logits, stu_feats=stu.feats, stu_embed=stu.embed,
                              tea_logits=tea.logits, tea_feats=tea.feats, tea_means=tea.means, tea_embed=tea.embed,
                              conn_feats=conn)

    def loss_terms(self, out: DistillOutputs) -> Tensor:
        """Phase "losses": the unweighted losses as one fp32 vector (no host sync)."""
        with self.rt.autocast():
            terms = [loss(*[getattr(out, name) for name in loss.inputs]) for loss in self.losses]
        return torch.stack([t.float() for t in terms])

    def backward(self, terms: Tensor) -> Tensor:
        """Phase "backward": the weighted total (returned, detached) and its gradients (scaled for fp16)."""
        total = (terms * self.weights).sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        return total.detach()

    def optimizer_step(self) -> None:
        """Phase "optimizer": SGD (skipped by the scaler on a non-finite fp16 gradient), then the lr step."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def run(self, images: Tensor, labels: Tensor, mark: Callable[[], None] = _no_mark,
            cached: TeacherTargets | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Run the `PHASES` in order, calling `mark()` after each (a benchmark's clock), with the teacher or
        its `cached` targets; return the student's logits (detached), the loss terms and the weighted total,
        all on the device. No stage map outlives the step: the outputs are dropped before the backward pass,
        which then frees each map as soon as its gradient no longer needs it."""
        tea = self.teacher_outputs(images, cached)
        mark()
        out = self.student_outputs(images, labels, tea)
        mark()
        terms = self.loss_terms(out)
        mark()
        logits = out.stu_logits.detach()
        del out, tea
        total = self.backward(terms)
        mark()
        self.optimizer_step()
        mark()
        return logits, terms.detach(), total

    __call__ = run
