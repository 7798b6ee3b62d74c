"""Choosing a loss implementation: `impl` is auto | triton | cuda | eager."""
from __future__ import annotations

from torch import Tensor

from fastcd.errors import FastcdError

IMPLS = ("auto", "triton", "cuda", "eager")


def check_impl(impl: str, loss: str, offered: tuple[str, ...]) -> None:
    """A FastcdError unless `impl` is one of `offered` (a subset of IMPLS)."""
    if impl not in offered:
        raise FastcdError(f"{loss}: unknown impl {impl!r}; choose from {', '.join(offered)}")


def resolve_impl(impl: str, x: Tensor) -> str:
    """'auto' becomes 'triton' for CUDA tensors and 'eager' elsewhere; the rest stay as they are."""
    if impl == "auto":
        return "triton" if x.is_cuda else "eager"
    return impl
