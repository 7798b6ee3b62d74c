"""Synthetic, learnable data made on the device: per-class smooth patterns plus noise.

For benchmarks (no disk, no decode) and for tests (a model can fit it in a few steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcd.config import DataConfig
from fastcd.data.base import BatchLoader, LoaderContext, Split
from fastcd.data.in_memory import InMemoryLoader

DEFAULT_SIZES = {"train": 2048, "val": 512}


def synthetic_loader(cfg: DataConfig, split: Split, ctx: LoaderContext) -> BatchLoader:
    """`train_subset`/`val_subset` images (default 2048/512) of `max(res, val_res)` pixels, seeded."""
    n = (cfg.train_subset if split == "train" else cfg.val_subset) or DEFAULT_SIZES[split]
    side = max(cfg.res, cfg.val_res, cfg.max_res)
    g = torch.Generator().manual_seed(ctx.seed + (0 if split == "train" else 1))
    patterns = F.interpolate(torch.rand(ctx.num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(ctx.seed)),
                             size=(side, side), mode="bilinear", align_corners=False)
    labels = torch.randint(0, ctx.num_classes, (n,), generator=g)
    noise = torch.rand(n, 3, side, side, generator=g)
    images = ((0.7 * patterns[labels] + 0.3 * noise) * 255).round().to(torch.uint8)
    return InMemoryLoader(images, labels, cfg, split, ctx)
