"""Top-1/top-5 error on a validation loader (1 crop; optional flip test-time augmentation)."""
from __future__ import annotations

import torch
from torch import nn

from fastcd.data.base import BatchLoader
from fastcd.engine.metrics import Meter
from fastcd.engine.runtime import Runtime


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, rt: Runtime, flip_tta: bool = False) -> dict[str, float]:
    """Errors in percent over every validation sample (exact across DDP ranks: sums are all-reduced)."""
    was_training = model.training
    model.eval()
    meter = Meter(0, rt.device)
    empty = torch.zeros(0, device=rt.device)
    for images, labels in loader:
        with rt.autocast():
            logits = model(images).logits.float()
            if flip_tta:
                logits = logits + model(images.flip(3)).logits.float()
        meter.update(empty, torch.zeros((), device=rt.device), logits, labels, 0)
    model.train(was_training)
    meter.reduce()
    stats = meter.read()
    return {"top1_err": stats["top1_err"], "top5_err": stats["top5_err"], "samples": stats["samples"]}
