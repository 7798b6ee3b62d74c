"""Checkpoints: written atomically, read back with tensors and plain values only, carrying the config that made
them. Below every user (the trainer, the teacher loader, the commands)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_path

FORMAT = "fastcd-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save `state` (plain tensors and values) to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a fastcd checkpoint on the CPU, tensors and plain values only (`weights_only`: a file that would
    run code when unpickled is refused); a missing, corrupt or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FastcdError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise FastcdError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FastcdError(f"{str(path)!r} is not a fastcd checkpoint (expected format {FORMAT})")
    return ckpt
