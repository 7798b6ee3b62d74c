"""Choosing a loss implementation: `impl` is auto | triton | cuda | eager."""
from __future__ import annotations

from torch import Tensor

from fastcd.errors import FastcdError

IMPLS = ("auto", "triton", "cuda", "eager")


def check_impl(impl: str, loss: str, offered: tuple[str, ...]) -> None:
    """A FastcdError unless `impl` is one of `offered` (a subset of IMPLS)."""
    if impl not in offered:
        raise FastcdError(f"{loss}: unknown impl {impl!r}; choose from {', '.join(offered)}")


def resolve_impl(impl: str, x: Tensor, cuda_ok: bool = False) -> str:
    """'auto' becomes, for CUDA tensors, 'cuda' where the caller says the C++ kernel can run (it was the
    fastest on an H200: bench/results/2026-11-28-nvidia-h200-kernels.json), else 'triton'; 'eager'
    elsewhere. Explicit choices stay as they are."""
    if impl == "auto":
        return ("cuda" if cuda_ok else "triton") if x.is_cuda else "eager"
    return impl
