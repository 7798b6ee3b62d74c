"""The names a config refers to, known without torch: every loss (its family, the outputs it reads, its
parameters) and the loss-decay presets (their original run length).

`fastcd.config` validates against these alone, so loading a config imports neither torch nor the kernels.
`fastcd.losses.registry` gives each registered loss class its family and inputs from here and checks, at
import, that its constructor takes exactly the parameters listed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from fastcd.errors import FastcdError

# Fields of `fastcd.models.DistillOutputs` a loss may read.
INPUT_NAMES = ("stu_logits", "tea_logits", "labels", "stu_feats", "tea_feats", "tea_means", "conn_feats",
               "stu_embed", "tea_embed")
TEACHER_INPUTS = ("tea_logits", "tea_feats", "tea_means", "tea_embed", "conn_feats")  # need a teacher or a cache
# The seed's loss types; the loss-rate decay (EDT) silences a family whose name holds `ce` or `kd` early on.
FAMILIES = ("ce_family", "kd_family", "kdv2_family", "fd_family")
# The original run length of each decay preset: milestones count epochs of it and scale to train.epochs.
BASE_EPOCHS = {"imagenet": 100, "cifar": 200}


@dataclass(frozen=True)
class LossEntry:
    """What a config may know of a loss: its family (the default `loss_type`), the `DistillOutputs` fields
    it is called with, in order, and the parameters its config entry may set."""

    family: str
    inputs: tuple[str, ...]
    params: tuple[str, ...] = ()


LOSS_NAMES: dict[str, LossEntry] = {
    "CELoss": LossEntry("ce_family", ("stu_logits", "labels"), ("label_smoothing",)),
    "KDLoss": LossEntry("kd_family", ("stu_logits", "tea_logits"), ("T",)),
    "KDLossv2": LossEntry("kdv2_family", ("stu_logits", "tea_logits", "labels"), ("T", "impl")),
    "CDLoss": LossEntry("fd_family", ("conn_feats", "tea_means"), ("impl",)),
    "ATLoss": LossEntry("fd_family", ("stu_feats", "tea_feats")),
    "FitNetLoss": LossEntry("fd_family", ("conn_feats", "tea_feats"), ("stage",)),
    "RKDLoss": LossEntry("fd_family", ("stu_embed", "tea_embed"), ("distance_weight", "angle_weight")),
}


def nearest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def loss_entry(name: str) -> LossEntry:
    """The entry for `name`, or a FastcdError naming the valid names."""
    if name not in LOSS_NAMES:
        raise FastcdError(f"unknown loss_name {name!r}{nearest(name, list(LOSS_NAMES))}; "
                          f"registered: {', '.join(sorted(LOSS_NAMES))}")
    return LOSS_NAMES[name]
