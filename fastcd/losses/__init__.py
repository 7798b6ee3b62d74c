"""Distillation losses, under the seed's names and call signatures, resolved by `loss_name`."""
from fastcd.losses.at import ATLoss
from fastcd.losses.cd import CDLoss
from fastcd.losses.ce import CELoss
from fastcd.losses.fitnets import FitNetLoss
from fastcd.losses.gkd import KDLossv2
from fastcd.losses.kd import KDLoss
from fastcd.losses.registry import LOSSES, DistillLoss, build_loss, loss_class, register
from fastcd.losses.rkd import RKDLoss

__all__ = ["LOSSES", "ATLoss", "CDLoss", "CELoss", "DistillLoss", "FitNetLoss", "KDLoss", "KDLossv2", "RKDLoss",
           "build_loss", "loss_class", "register"]
