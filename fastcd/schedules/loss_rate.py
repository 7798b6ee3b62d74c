"""Loss-rate decay (DESIGN.md): each loss's weight at a 1-based epoch, `lrdv1` and `lrdv2` (EDT).

The milestones belong to the original run lengths (ImageNet: 30 of 100 epochs; CIFAR: 60 and 160 of
200). A run of `epochs` scales them by epochs / base, compared in integers (`e * base` vs
`m * epochs`), so the original lengths give the original formulas exactly.
"""
from __future__ import annotations

from fastcd.errors import FastcdError
from fastcd.names import BASE_EPOCHS


def _is_teacher_family(loss_type: str) -> bool:
    """EDT silences a type whose name contains `ce` or `kd` early on."""
    return "ce" in loss_type or "kd" in loss_type


def adjust_loss_alpha(alpha: float, epoch: int, factor: float = 0.9, loss_type: str = "ce_family",
                      loss_rate_decay: str = "lrdv1", dataset_type: str = "imagenet",
                      epochs: int | None = None) -> float:
    """The seed's `adjust_loss_alpha`, plus `epochs` (default: the preset's 100 or 200) to scale milestones."""
    if dataset_type not in BASE_EPOCHS:
        raise FastcdError(f"dataset_type {dataset_type!r} is not one of {', '.join(BASE_EPOCHS)}")
    if loss_rate_decay not in ("lrdv1", "lrdv2"):
        raise FastcdError(f"loss_rate_decay {loss_rate_decay!r} is not one of lrdv1, lrdv2")
    base = BASE_EPOCHS[dataset_type]
    run = epochs or base
    scaled = epoch * base  # compare e * base with milestone * run: e >= m * run / base

    if dataset_type == "imagenet":
        exponent = scaled // (30 * run)
        if loss_rate_decay == "lrdv2" and _is_teacher_family(loss_type) and scaled <= 30 * run:
            return 0.0
        return alpha * factor**exponent
    if loss_rate_decay == "lrdv1":
        return alpha
    k = 2 if scaled >= 160 * run else 1 if scaled >= 60 * run else 0
    if _is_teacher_family(loss_type) and scaled <= 60 * run:
        return 0.0
    return alpha * factor**k
