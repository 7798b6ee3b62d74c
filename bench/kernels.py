"""`fastcd bench kernels`: forward+backward time of the CD and GKD losses, eager vs torch.compile vs
the fused kernels, at ResNet-18/34 stage shapes, with GB/s against the card's measured copy bandwidth.

Needs a CUDA GPU; `--cpu` runs tiny shapes under the Triton interpreter only to prove the code runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from fastcd.errors import FastcdError
from fastcd.losses.cd import cd_eager, teacher_means
from fastcd.losses.gkd import gkd_eager
from fastcd.losses.reference import cd_reference, gkd_reference
from fastcd.utils.results import add_out_argument, peak_memory, record

STAGE_CHANNELS = (64, 128, 256, 512)  # ResNet-18 and ResNet-34 (the connectors map to the teacher's)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = [0.5, 0.2, 0.8]
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # of the loss, by input dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes (default: 64 256)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="input side; stages are /4 .. /32 (default %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="logit width for the GKD loss (default %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="input precision (default %(default)s)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                        help="memory layouts of the CD maps (default both)")
    parser.add_argument("--impls", nargs="+", default=["eager", "compile", "triton", "cuda"],
                        choices=["eager", "compile", "triton", "cuda"], help="implementations to time, each against "
                        "eager (default: all four; cuda needs the built extension)")
    parser.add_argument("--cpu", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (proves it runs; times mean nothing)")
    parser.add_argument("--no-record", action="store_true", help="do not append to the results folder")
    add_out_argument(parser)


def timer(fn: Callable[[], object], device: torch.device) -> list[float]:
    """[median, p20, p80] in ms: triton.testing.do_bench on a GPU, a plain loop on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=QUANTILES))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(times), min(times), max(times)]


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), device)[0]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def cd_impls(names: list[str]) -> dict[str, Callable]:
    """impl name -> f(stu, tea_means) giving the loss; a missing CUDA extension is reported and skipped."""
    out: dict[str, Callable] = {}
    for name in names:
        if name == "eager":
            out[name] = cd_eager
        elif name == "compile":
            out[name] = torch.compile(cd_eager)
        elif name == "triton":
            from fastcd.kernels.cd_triton import cd_triton
            out[name] = cd_triton
        elif name == "cuda":
            from fastcd.kernels.cd_cuda import cd_cuda, extension
            try:
                extension()
            except FastcdError as e:
                print(f"cd/cuda skipped: {e}")
                continue
            out[name] = cd_cuda
    return out


def gkd_impls(names: list[str]) -> dict[str, Callable]:
    """impl name -> f(stu, tea, labels, T); there is no CUDA C++ GKD kernel."""
    out: dict[str, Callable] = {}
    if "eager" in names:
        out["eager"] = gkd_eager
    if "compile" in names:
        out["compile"] = torch.compile(gkd_eager)
    if "triton" in names:
        from fastcd.kernels.gkd_triton import gkd_triton
        out["triton"] = gkd_triton
    return out


def measure(loss_fn: Callable[[], torch.Tensor], grad_of: list[torch.Tensor], nbytes: int,
            device: torch.device, copy_gbs: float, reference: float) -> dict:
    """Time of forward + backward (fresh gradients, none accumulated), GB/s of the minimal traffic, and the
    loss's relative error against the float64 `reference` (an impl that is wrong is not worth timing)."""
    def step() -> None:
        torch.autograd.grad(loss_fn(), grad_of)

    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.no_grad():
        rel_err = abs(float(loss_fn()) - reference) / max(abs(reference), 1e-30)  # intentional sync
    if not rel_err <= RTOL[grad_of[0].dtype]:
        return {"status": "wrong", "rel_err": rel_err}
    med, p20, p80 = timer(step, device)
    gbs = nbytes / (med * 1e-3) / 1e9
    out = {"status": "ok", "ms": round(med, 4), "ms_p20": round(p20, 4), "ms_p80": round(p80, 4),
           "GBps": round(gbs, 1), "rel_err": float(f"{rel_err:.3g}")}
    if copy_gbs:
        out["pct_copy_bw"] = round(100 * gbs / copy_gbs, 1)
    if device.type == "cuda":
        out["peak_extra_mib"] = round(extra_mib, 1)
    return out


def bench_cd(batch: int, size: int, dtype: torch.dtype, layout: str, impls: dict, device: torch.device,
             copy_gbs: float) -> dict:
    shapes = [(batch, c, size // 4 >> i, size // 4 >> i) for i, c in enumerate(STAGE_CHANNELS)]
    fmt = LAYOUTS[layout]
    stu = [torch.randn(s, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_() for s in shapes]
    tea = [torch.randn(s, device=device, dtype=dtype).to(memory_format=fmt) for s in shapes]
    means = teacher_means(tea)  # CD reads the teacher's channel means (from its maps, or a teacher cache)
    nbytes = sum(s.numel() for s in stu) * stu[0].element_size()  # read s (the means are tiny; grad_s an expand)
    with torch.no_grad():
        reference = float(cd_reference(stu, tea))
    return {name: measure(lambda f=f: f(stu, means), stu, nbytes, device, copy_gbs, reference)
            for name, f in impls.items()}


def bench_gkd(batch: int, classes: int, dtype: torch.dtype, impls: dict, device: torch.device,
              copy_gbs: float) -> dict:
    stu = torch.randn(batch, classes, device=device, dtype=dtype).requires_grad_()
    tea = torch.randn(batch, classes, device=device, dtype=dtype)
    labels = torch.where(torch.rand(batch, device=device) < 0.7, tea.argmax(dim=1),
                         torch.randint(0, classes, (batch,), device=device))
    nbytes = 3 * stu.numel() * stu.element_size()
    with torch.no_grad():
        reference = float(gkd_reference(stu, tea, labels, 4.0))
    return {name: measure(lambda f=f: f(stu, tea, labels, 4.0), [stu], nbytes, device, copy_gbs, reference)
            for name, f in impls.items()}


def report(title: str, rows: dict) -> None:
    """One line per impl with its ratio to eager (the baseline of this run)."""
    print(f"\n{title}")
    base = rows.get("eager", {}).get("ms")
    for name, r in rows.items():
        if r["status"] != "ok":
            print(f"  {name:8s} WRONG: the loss is {r['rel_err']:.2g} away from the float64 reference; not timed")
            continue
        ratio = f"{base / r['ms']:6.2f}x eager" if base else ""
        pct = f"{r['pct_copy_bw']:5.1f}% of copy" if "pct_copy_bw" in r else ""
        mem = f"+{r['peak_extra_mib']:.0f} MiB peak" if "peak_extra_mib" in r else ""
        print(f"  {name:8s} {r['ms']:9.3f} ms [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}]  {r['GBps']:8.1f} GB/s  "
              f"{pct}  {ratio}  {mem}  rel. err {r['rel_err']:.1e}")
        if base:
            r["speedup_vs_eager"] = round(base / r["ms"], 3)


def run(args: argparse.Namespace) -> int:
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (cd_impls, gkd_impls)
        device, batches, size, classes = torch.device("cpu"), [2], 32, 10
        names = [n for n in args.impls if n in ("eager", "triton")]
    elif not torch.cuda.is_available():
        raise FastcdError("bench kernels needs a CUDA GPU (none found); --cpu runs tiny shapes under the "
                          "Triton interpreter only to prove the code runs")
    else:
        device, batches, size, classes = torch.device("cuda"), args.batch, args.image_size, args.classes
        names = args.impls
    dtype = DTYPES[args.dtype]
    copy_gbs = copy_bandwidth(device) if device.type == "cuda" else 0.0
    if copy_gbs:
        print(f"device-to-device copy: {copy_gbs:.1f} GB/s")
    cd_fns, gkd_fns = cd_impls(names), gkd_impls(names)
    results = []
    for batch in batches:
        for layout in args.layouts:
            cd = bench_cd(batch, size, dtype, layout, cd_fns, device, copy_gbs)
            report(f"CD loss, batch {batch}, {size} px, {args.dtype}, {layout}, forward+backward", cd)
            results.append({"loss": "cd", "batch": batch, "image_size": size, "dtype": args.dtype, "layout": layout,
                            "impls": cd})
        gkd = bench_gkd(batch, classes, dtype, gkd_fns, device, copy_gbs)
        report(f"GKD loss, batch {batch}, {classes} classes, {args.dtype}, forward+backward", gkd)
        results.append({"loss": "gkd", "batch": batch, "classes": classes, "dtype": args.dtype, "impls": gkd})
    if not args.no_record and (args.out or not args.cpu):  # interpreter times only into an explicit --out
        path = record("kernels", {"copy_GBps": round(copy_gbs, 1), "interpreter": args.cpu, "runs": results,
                                  **peak_memory()}, args.out)
        print(f"\nrecorded in {path}")
    return 0
