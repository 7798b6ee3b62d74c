"""Loss-rate decay (lrdv1, lrdv2/EDT) and per-iteration learning-rate schedules."""
from fastcd.schedules.loss_rate import adjust_loss_alpha
from fastcd.schedules.lr import build_lr_scheduler, lr_factor

__all__ = ["adjust_loss_alpha", "build_lr_scheduler", "lr_factor"]
