"""One install for everything: the `fastcd` package, with kernels/, data_prep/ and bench/ mapped in as
`fastcd.kernels`, `fastcd.data_prep` and `fastcd.bench`, and the YAML files of configs/ as package data
(`fastcd.configs`)."""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
MAPPED = {"kernels": "fastcd.kernels", "data_prep": "fastcd.data_prep", "bench": "fastcd.bench"}


def mapped_packages() -> dict[str, str]:
    """Package name -> folder for every package under the mapped top-level folders."""
    out = {}
    for folder, pkg in MAPPED.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            out[name] = str(init.parent.relative_to(ROOT))
    return out


def cuda_extension() -> dict:
    """The optional CUDA C++ CD kernel (fastcd.kernels._cd_cuda): built only when FASTCD_BUILD_CUDA=1."""
    if os.environ.get("FASTCD_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None:
        raise SystemExit("FASTCD_BUILD_CUDA=1 but no CUDA toolkit found: put nvcc on PATH or set CUDA_HOME")
    # torch guesses CUDA_HOME from nvcc's place; libcudart may live in /usr/local/cuda/lib64 instead
    lib_dirs = [str(Path(h) / "lib64") for h in (CUDA_HOME, "/usr/local/cuda") if (Path(h) / "lib64").is_dir()]
    ext = CUDAExtension("fastcd.kernels._cd_cuda", ["kernels/cd_cuda_binding.cpp", "kernels/cd_cuda.cu"],
                        library_dirs=lib_dirs, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


def config_packages() -> dict[str, str]:
    """configs/ (YAML only) shipped inside the package as fastcd.configs, one data package per folder."""
    return {".".join(["fastcd.configs", *d.relative_to(ROOT / "configs").parts]): str(d.relative_to(ROOT))
            for d in [ROOT / "configs", *sorted(p for p in (ROOT / "configs").rglob("*") if p.is_dir())]}


package_dir = {**mapped_packages(), **config_packages()}
setup(
    name="fastcd",
    version="0.1.0",
    description="High-throughput Channel Distillation training pipeline",
    python_requires=">=3.10",
    packages=find_packages(include=["fastcd", "fastcd.*"]) + list(package_dir),
    package_dir=package_dir,
    package_data={name: ["*.yaml"] for name in config_packages()},
    entry_points={"console_scripts": ["fastcd=fastcd.cli:main"]},
    **cuda_extension(),
)
