"""Channel distillation (the seed's `CDLoss`): match per-channel spatial means, stage by stage."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastcd.kernels.dispatch import IMPLS, check_impl
from fastcd.losses.registry import DistillLoss, fused_impl, register
from fastcd.utils.tensors import compute_dtype, upcast


def cd_eager(stu_features: Sequence[Tensor], tea_features: Sequence[Tensor]) -> Tensor:
    """sum_i mean_{n,c} (mean_{h,w} s_i - mean_{h,w} t_i)^2 in fp32 (fp64 for fp64 inputs)."""
    total = torch.zeros((), device=stu_features[0].device, dtype=compute_dtype(stu_features[0]))
    for s, t in zip(stu_features, tea_features, strict=True):
        diff = upcast(s).mean(dim=(2, 3)) - upcast(t).mean(dim=(2, 3))
        total = total + diff.pow(2).mean()
    return total


def _cuda_kernel_runs(stu: Sequence[Tensor], tea: Sequence[Tensor]) -> bool:
    """Whether `auto` may take the C++ kernel: built at install time, maps of one dtype per stage."""
    if not stu[0].is_cuda:
        return False
    from fastcd.kernels.cd_cuda import built_extension

    return built_extension() is not None and all(s.dtype == t.dtype for s, t in zip(stu, tea, strict=True))


@register("CDLoss")
class CDLoss(DistillLoss):
    """`CDLoss()(stu_features, tea_features)`; the student features are the connectors' outputs.

    `impl`: auto (on CUDA fp32/bf16/fp16 maps the C++ kernel when it was built at install time, else the
    Triton one; eager elsewhere), triton, cuda (the optional C++ extension) or eager. The fused kernels
    give the (frozen) teacher no gradient.
    """

    inputs = ("conn_feats", "tea_feats")
    family = "fd_family"

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        check_impl(impl, "CDLoss", IMPLS)
        if impl == "cuda":
            from fastcd.kernels.cd_cuda import extension

            extension()  # fail at construction, not at the first step
        self.impl = impl

    def forward(self, stu_features: Sequence[Tensor], tea_features: Sequence[Tensor]) -> Tensor:
        impl = fused_impl(self.impl, stu_features[0], cuda_ok=_cuda_kernel_runs(stu_features, tea_features))
        if impl == "triton":
            from fastcd.kernels.cd_triton import cd_triton

            return cd_triton(stu_features, tea_features)
        if impl == "cuda":
            from fastcd.kernels.cd_cuda import cd_cuda

            return cd_cuda(stu_features, tea_features)
        return cd_eager(stu_features, tea_features)
