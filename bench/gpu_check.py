"""Check, in seconds, that this machine can run the GPU suite: `python -m fastcd.bench.gpu_check [--cpu]`.

Prints the GPU, where `Python.h` and `nvcc` are, and proves one Triton kernel launch and one batched
JPEG decode (`decode_jpeg(list, device=...)`) on the device; the first thing missing ends it with one
line and exit code 2. `--cpu` (the suite's dry run) checks the same on the CPU: Triton under its
interpreter, the batched decode on CPU tensors; a missing nvcc or Python.h is then only reported.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


def fail(what: str) -> None:
    print(f"gpu_check: {what}", file=sys.stderr)
    raise SystemExit(2)


def check(cpu: bool) -> None:
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import numpy as np
    import torch
    from PIL import Image

    if not cpu and not torch.cuda.is_available():
        fail(f"no CUDA device is visible to torch {torch.__version__}; run this on the GPU machine")
    device = torch.device("cpu" if cpu else "cuda")
    name = "CPU (dry run)" if cpu else torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}; python {sys.version.split()[0]}")

    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
    for what, found in (("Python.h", header if header.is_file() else None), ("nvcc", nvcc)):
        if found is None and not cpu:
            fail(f"{what} not found: the CUDA C++ extension cannot be built here")
        print(f"{what}: {found or 'not found (dry run: only reported)'}")
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"nvcc: {version[-1] if version else '?'}")

    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x = torch.arange(100, dtype=torch.float32, device=device)
    add_one[(1,)](x, 100, BLOCK=128)
    if not torch.equal(x.cpu(), torch.arange(1, 101, dtype=torch.float32)):
        fail("a Triton kernel launched but wrote wrong values")
    print(f"triton {triton.__version__}: one kernel launch OK")

    from torchvision.io import ImageReadMode, decode_jpeg

    rng = np.random.default_rng(0)
    jpegs = []
    for h, w in ((37, 53), (64, 48)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        fail(f"batched decode_jpeg on {device} failed: {str(e).splitlines()[0]}")
    if [tuple(im.shape) for im in images] != [(3, 37, 53), (3, 64, 48)]:
        fail(f"batched decode_jpeg gave shapes {[tuple(im.shape) for im in images]}")
    print(f"decode_jpeg: a batch of 2 decoded on {device} OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the dry run's checks, on the CPU")
    check(parser.parse_args().cpu)


if __name__ == "__main__":
    main()
