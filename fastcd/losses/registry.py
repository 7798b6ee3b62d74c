"""The one registry of losses: `loss_name` in a config resolves here.

Every loss is an `nn.Module` subclass of `DistillLoss`, whose `inputs` names the fields of
`fastcd.models.DistillOutputs` it is called with, in order. The engine calls
`loss(*[getattr(outputs, name) for name in loss.inputs])`, so a loss keeps the seed's call
signature (`KDLossv2(T)(stu_pred, tea_pred, label)`) and the engine needs no per-loss code.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from fastcd.errors import FastcdError
from fastcd.kernels.dispatch import resolve_impl

# Fields of DistillOutputs a loss may ask for.
INPUT_NAMES = ("stu_logits", "tea_logits", "labels", "stu_feats", "tea_feats", "tea_means", "conn_feats",
               "stu_embed", "tea_embed")
TEACHER_INPUTS = ("tea_logits", "tea_feats", "tea_means", "tea_embed", "conn_feats")  # need a teacher or a cache


NUM_STAGES = 4  # layer1..layer4 of every ResNet here
# The seed's loss types; the loss-rate decay (EDT) silences a family whose name holds `ce` or `kd` early on.
FAMILIES = ("ce_family", "kd_family", "kdv2_family", "fd_family")


class DistillLoss(nn.Module):
    """Base class: declares the inputs (see INPUT_NAMES) the loss is called with, and its family (FAMILIES),
    the default `loss_type` of its config entries."""

    inputs: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""  # every loss names its own

    def connector_stages(self) -> tuple[int, ...]:
        """The stages (0-based) whose connector outputs this loss reads: only those connectors are built."""
        return tuple(range(NUM_STAGES)) if "conn_feats" in self.inputs else ()


LOSSES: dict[str, type[DistillLoss]] = {}
L = TypeVar("L", bound=type[DistillLoss])


def register(name: str) -> Callable[[L], L]:
    """Class decorator adding a loss to the registry under `name` (the config's `loss_name`)."""

    def add(cls: L) -> L:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        unknown = set(cls.inputs) - set(INPUT_NAMES)
        if unknown:
            raise ValueError(f"loss {name!r} asks for unknown inputs {sorted(unknown)}")
        if cls.family not in FAMILIES:
            raise ValueError(f"loss {name!r} has family {cls.family!r}, not one of {FAMILIES}")
        LOSSES[name] = cls
        return cls

    return add


def nearest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def loss_class(name: str) -> type[DistillLoss]:
    """The registered class for `name`, or a FastcdError naming the valid names."""
    if name not in LOSSES:
        raise FastcdError(f"unknown loss_name {name!r}{nearest(name, list(LOSSES))}; "
                          f"registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_params(name: str) -> list[str]:
    """Constructor parameters a config entry may set for loss `name`."""
    sig = inspect.signature(loss_class(name).__init__)
    return [p for p in sig.parameters if p != "self"]


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
