"""Learning-rate schedules, evaluated per iteration as a multiplier of the base lr.

`multistep` (the original: x gamma at each milestone epoch), `step` (x gamma every step_size epochs),
`cosine` (to end_lr_ratio), `linear` (FFCV's ramp: 0 -> 1 until peak_epoch, then down to end_lr_ratio
at the last iteration). An optional linear warm-up from 0 over `warmup_epochs` multiplies any of them.
"""
from __future__ import annotations

import bisect
import math

import torch

from fastcd.config import OptimConfig


def lr_factor(cfg: OptimConfig, epoch_float: float, total_epochs: int) -> float:
    """Multiplier of `cfg.lr` at a fractional epoch (0 = first iteration)."""
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), epoch_float)
    elif cfg.schedule == "step":
        factor = cfg.gamma ** int(epoch_float // cfg.step_size)
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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_epochs: int,
                       steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration; its state_dict (the step count) resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step / steps_per_epoch, total_epochs))
