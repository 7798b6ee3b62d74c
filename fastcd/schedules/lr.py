"""Learning-rate schedules, evaluated per iteration as a multiplier of the base lr.

`multistep` (the original: x gamma at each milestone epoch), `step` (x gamma every step_size epochs),
`cosine` (to end_lr_ratio), `linear` (FFCV's ramp: 0 -> 1 until peak_epoch, then down to end_lr_ratio
at the last iteration). An optional linear warm-up from 0 over `warmup_epochs` multiplies any of them.

`milestones` and `step_size` count epochs of the preset's original run (`base_epochs`: 100 for
imagenet, 200 for cifar) and scale with the run's length exactly as the loss-decay milestones do
(`fastcd.schedules.loss_rate`), compared as `epoch * base >= milestone * epochs`, so the original
length gives the original schedule and `--set train.epochs=16` keeps its shape.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fastcd.names import BASE_EPOCHS

if TYPE_CHECKING:
    from fastcd.config import Config, OptimConfig


def lr_factor(cfg: OptimConfig, epoch_float: float, total_epochs: int, base_epochs: int | None = None) -> float:
    """Multiplier of `cfg.lr` at a fractional epoch (0 = first iteration) of a `total_epochs` run whose
    milestones count epochs of a `base_epochs` run (None: of this run)."""
    base = base_epochs or total_epochs
    scaled = epoch_float * base  # compare with milestone * total_epochs
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(scaled >= m * total_epochs for m in cfg.milestones)
    elif cfg.schedule == "step":
        factor = cfg.gamma ** int(scaled // (cfg.step_size * total_epochs))
    elif cfg.schedule == "cosine":
        progress = min(epoch_float / total_epochs, 1.0)
        factor = cfg.end_lr_ratio + (1 - cfg.end_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    else:  # linear ramp up then down
        if epoch_float < cfg.peak_epoch:
            factor = epoch_float / cfg.peak_epoch
        else:
            span = max(total_epochs - cfg.peak_epoch, 1e-12)
            factor = 1 + (cfg.end_lr_ratio - 1) * min((epoch_float - cfg.peak_epoch) / span, 1.0)
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        factor *= epoch_float / cfg.warmup_epochs
    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
                       steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration over `cfg.train.epochs`, milestones scaled from the
    `cfg.train.dataset_type` preset's length; its state_dict (the step count) resumes exactly."""
    base, epochs = BASE_EPOCHS[cfg.train.dataset_type], cfg.train.epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.optim, step / steps_per_epoch, epochs, base))
