"""Channel distillation (the seed's `CDLoss`): match per-channel spatial means, stage by stage."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastcd.kernels.dispatch import IMPLS, check_impl
from fastcd.losses.registry import DistillLoss, fused_impl, register
from fastcd.utils.tensors import channel_means, compute_dtype, upcast


def teacher_means(tea: Sequence[Tensor]) -> list[Tensor]:
    """The teacher's per-stage channel means: from its (N, C, H, W) maps, or already (N, C) (a teacher cache)."""
    return [t if t.dim() == 2 else channel_means(t) for t in tea]


def cd_eager(stu_features: Sequence[Tensor], tea_means: Sequence[Tensor]) -> Tensor:
    """sum_i mean_{n,c} (mean_{h,w} s_i - m_i)^2 in fp32 (fp64 for fp64 inputs), from the teacher's means m_i."""
    total = torch.zeros((), device=stu_features[0].device, dtype=compute_dtype(stu_features[0]))
    for s, m in zip(stu_features, tea_means, strict=True):
        diff = channel_means(s) - upcast(m)
        total = total + diff.pow(2).mean()
    return total


@register("CDLoss")
class CDLoss(DistillLoss):
    """`CDLoss()(stu_features, tea_features)`; the student features are the connectors' outputs, the
    teacher's are its stage maps (N, C, H, W) or their channel means (N, C): CD reads only the means, which
    the engine passes (`tea_means`: from the live teacher or a teacher-target cache).

    `impl`: auto (on CUDA fp32/bf16/fp16 maps the C++ kernel when it was built at install time, else the
    Triton one; eager elsewhere), triton, cuda (the optional C++ extension) or eager. The fused kernels
    give the (frozen) teacher no gradient.
    """

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        check_impl(impl, "CDLoss", IMPLS)
        if impl == "cuda":
            from fastcd.kernels.cd_cuda import extension

            extension()  # fail at construction, not at the first step
        self.impl = impl

    def forward(self, stu_features: Sequence[Tensor], tea_features: Sequence[Tensor]) -> Tensor:
        means = teacher_means(tea_features)
        built = stu_features[0].is_cuda and _cuda_extension_built()
        impl = fused_impl(self.impl, stu_features[0], cuda_ok=built)
        if impl == "triton":
            from fastcd.kernels.cd_triton import cd_triton

            return cd_triton(stu_features, means)
        if impl == "cuda":
            from fastcd.kernels.cd_cuda import cd_cuda

            return cd_cuda(stu_features, means)
        return cd_eager(stu_features, means)


def _cuda_extension_built() -> bool:
    """Whether `auto` may take the C++ kernel: it was built at install time."""
    from fastcd.kernels.cd_cuda import built_extension

    return built_extension() is not None
