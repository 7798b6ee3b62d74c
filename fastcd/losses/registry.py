"""The one registry of losses: `loss_name` in a config resolves here.

Every loss is an `nn.Module` subclass of `DistillLoss`, whose `inputs` names the fields of
`fastcd.models.DistillOutputs` it is called with, in order. The engine calls
`loss(*[getattr(outputs, name) for name in loss.inputs])`, so a loss keeps the seed's call
signature (`KDLossv2(T)(stu_pred, tea_pred, label)`) and the engine needs no per-loss code.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from fastcd.errors import FastcdError
from fastcd.kernels.dispatch import resolve_impl
from fastcd.names import FAMILIES, INPUT_NAMES, LOSS_NAMES, TEACHER_INPUTS, loss_entry, nearest

__all__ = ["FAMILIES", "INPUT_NAMES", "LOSSES", "NUM_STAGES", "TEACHER_INPUTS", "DistillLoss", "build_loss",
           "fused_impl", "loss_class", "loss_params", "nearest", "register"]

NUM_STAGES = 4  # layer1..layer4 of every ResNet here


class DistillLoss(nn.Module):
    """Base class: the inputs (see INPUT_NAMES) the loss is called with, and its family (FAMILIES), the
    default `loss_type` of its config entries; `register` sets both from `fastcd.names.LOSS_NAMES`."""

    inputs: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""

    def connector_stages(self) -> tuple[int, ...]:
        """The stages (0-based) whose connector outputs this loss reads: only those connectors are built."""
        return tuple(range(NUM_STAGES)) if "conn_feats" in self.inputs else ()


LOSSES: dict[str, type[DistillLoss]] = {}
L = TypeVar("L", bound=type[DistillLoss])


def register(name: str) -> Callable[[L], L]:
    """Class decorator adding a loss to the registry under `name` (the config's `loss_name`), with the family
    and inputs `fastcd.names` lists for it; its constructor must take exactly the parameters listed there."""

    def add(cls: L) -> L:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        if name not in LOSS_NAMES:
            raise ValueError(f"loss {name!r} is not listed in fastcd.names.LOSS_NAMES")
        entry = LOSS_NAMES[name]
        init = cls.__init__
        takes = () if init is nn.Module.__init__ else tuple(p for p in inspect.signature(init).parameters
                                                            if p != "self")
        if takes != entry.params:
            raise ValueError(f"loss {name!r} takes {takes}, fastcd.names lists {entry.params}")
        cls.inputs, cls.family = entry.inputs, entry.family
        LOSSES[name] = cls
        return cls

    return add


def loss_class(name: str) -> type[DistillLoss]:
    """The registered class for `name`, or a FastcdError naming the valid names."""
    loss_entry(name)
    return LOSSES[name]


def loss_params(name: str) -> list[str]:
    """Constructor parameters a config entry may set for loss `name`."""
    return list(loss_entry(name).params)


def fused_impl(impl: str, x: Tensor, cuda_ok: bool = False) -> str:
    """The implementation a loss with fused kernels runs: `auto` is a fused kernel for CUDA tensors of at
    most fp32 (the kernels accumulate in fp32; the C++ one where `cuda_ok`) and eager otherwise; explicit
    choices stay."""
    if impl == "auto" and x.dtype == torch.float64:
        return "eager"
    return resolve_impl(impl, x, cuda_ok)


def build_loss(name: str, params: dict[str, Any]) -> DistillLoss:
    """Instantiate loss `name` with `params`; unknown parameters are an error naming the nearest."""
    allowed = loss_params(name)
    for key in params:
        if key not in allowed:
            raise FastcdError(f"loss {name!r} has no parameter {key!r}{nearest(key, allowed)}; "
                              f"it takes: {', '.join(allowed) or 'nothing'}")
    return loss_class(name)(**params)
