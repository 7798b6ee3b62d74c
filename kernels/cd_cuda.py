"""Fused Channel Distillation loss, CUDA C++ version (cd_cuda.cu): loader and autograd Function.

The extension `fastcd.kernels._cd_cuda` is built by `FASTCD_BUILD_CUDA=1 pip install
--no-build-isolation -e .`; without it, `FASTCD_CUDA_JIT=1` compiles the same sources at first
use with torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from torch import Tensor

from fastcd.errors import FastcdError
from fastcd.kernels.cd_function import CDFunction
from fastcd.kernels.checks import check_features, check_no_teacher_grad

SOURCES = [Path(__file__).with_name("cd_cuda_binding.cpp"), Path(__file__).with_name("cd_cuda.cu")]


def cuda_library_dirs() -> list[str]:
    """Folders holding libcudart: torch guesses CUDA_HOME from nvcc's place, which can be wrong
    (nvcc in /usr/local/bin, libraries in /usr/local/cuda/lib64)."""
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    return [str(Path(h) / "lib64") for h in homes if h and (Path(h) / "lib64").is_dir()]


@functools.cache
def load_jit(build_dir: str | None = None, verbose: bool = False) -> ModuleType:
    """Compile and import the extension with torch.utils.cpp_extension.load (needs nvcc)."""
    from torch.utils.cpp_extension import load

    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    return load(name="fastcd_cd_cuda", sources=[str(p) for p in SOURCES], build_directory=build_dir,
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                extra_ldflags=[f"-L{d}" for d in cuda_library_dirs()], verbose=verbose)


@functools.cache
def built_extension() -> ModuleType | None:
    """The extension built at install time (`FASTCD_BUILD_CUDA=1`), or None; never compiles."""
    try:
        from fastcd.kernels import _cd_cuda
    except ImportError:
        return None
    return _cd_cuda


def extension() -> ModuleType:
    """The built extension, else the JIT-compiled one under FASTCD_CUDA_JIT=1, else a FastcdError."""
    ext = built_extension()
    if ext is None:
        if os.environ.get("FASTCD_CUDA_JIT") == "1":
            return load_jit()
        raise FastcdError("impl='cuda' needs the CUDA extension, which is not built: run "
                          "FASTCD_BUILD_CUDA=1 pip install --no-build-isolation -e . (needs nvcc), or set "
                          "FASTCD_CUDA_JIT=1 to compile it at first use, or use impl='triton'")
    return ext


def cd_cuda_forward(stu: Sequence[Tensor], tea_means: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The loss and the per-stage (N, C) fp32 differences, from the extension's kernel."""
    loss, *diffs = extension().cd_forward(list(stu), check_features(stu, tea_means))
    return loss, diffs


def cd_cuda(stu: Sequence[Tensor], tea_means: Sequence[Tensor]) -> Tensor:
    """The CD loss from the student maps and the teacher's channel means through the CUDA extension;
    gradients flow to the student maps only."""
    check_features(stu, tea_means)
    check_no_teacher_grad(tea_means)
    if not stu[0].is_cuda:
        raise FastcdError(f"impl='cuda' needs CUDA tensors, got stu_feats[0] on {stu[0].device}")
    return CDFunction.apply(cd_cuda_forward, *stu, *tea_means)
