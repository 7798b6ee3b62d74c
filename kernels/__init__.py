"""Fused kernels for the distillation losses and the GPU crop (imported as `fastcd.kernels`).

One kernel per module, in three layers: `@triton.jit` kernel(s), host launchers, and (for a loss) a
`torch.autograd.Function`; `fastcd.losses` only dispatches to them. On a CPU the Triton kernels run
only under Triton's interpreter (`TRITON_INTERPRET=1`, read when a kernel module is imported): the
tests set it in `tests/conftest.py`, `fastcd bench kernels --cpu` for itself.
"""
