"""Progressive resizing (as in FFCV's ImageNet recipe): min_res -> max_res between two epochs."""
from __future__ import annotations

from fastcd.config import DataConfig

RES_STEP = 32


def train_res(cfg: DataConfig, epoch: int) -> int:
    """Training resolution at 0-based `epoch`: `res`, or the ramp from min_res (up to start_ramp) to
    max_res (from end_ramp on), linear in between and rounded to a multiple of 32."""
    if not (cfg.min_res and cfg.max_res):
        return cfg.res
    if epoch <= cfg.start_ramp:
        return cfg.min_res
    if epoch >= cfg.end_ramp:
        return cfg.max_res
    t = (epoch - cfg.start_ramp) / (cfg.end_ramp - cfg.start_ramp)
    return int(round((cfg.min_res + t * (cfg.max_res - cfg.min_res)) / RES_STEP)) * RES_STEP
