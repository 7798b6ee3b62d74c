"""Fused kernels for the distillation losses (imported as `fastcd.kernels`).

One kernel per module, each in three layers: `@triton.jit` kernel(s), host launchers, and a
`torch.autograd.Function`. `fastcd.losses` only dispatches to them.

On a machine without CUDA, importing this package sets `TRITON_INTERPRET=1` (unless already set)
before any kernel is defined, so the Triton kernels run on CPU tensors through Triton's
interpreter: that is how the tests check them, in one pytest process with the rest of the suite.
Triton reads the variable when a kernel is decorated, so it has to happen here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
