"""Checkpoints: written atomically, read back with tensors and plain values only, carrying the config that made
them. Below every user (the trainer, the teacher loader, the commands)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_path

FORMAT = "fastcd-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save `state` (plain tensors and values) to `path` through a temporary file and a rename (`atomic_path`:
    fsynced; a full disk is a one-line error and leaves the previous file). Written through a Python file, so
    a failed write raises OSError with its errno, not torch's "unexpected pos"."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a fastcd checkpoint on the CPU, tensors and plain values only (`weights_only`: a file that would
    run code when unpickled is refused); a missing, corrupt or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FastcdError(f"checkpoint {str(path)!r} does not exist")
    not_ours = f"{str(path)!r} is not a fastcd checkpoint"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # its text is torch's advice to load with weights_only=False: not for this
        raise FastcdError(f"{not_ours}: the weights-only unpickler refused it (it holds Python objects other than "
                          "tensors and plain values, whose unpickling could run code, or it is damaged)") from None
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FastcdError(f"{not_ours}, or it is damaged: it cannot be read ({type(e).__name__}"
                          f"{': ' + first if first else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FastcdError(f"{str(path)!r} is not a fastcd checkpoint (expected format {FORMAT})")
    return ckpt
