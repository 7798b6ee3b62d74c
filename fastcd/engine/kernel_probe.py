"""The child process of `fastcd.engine.kernel_check`: run each convolution of a run in each asked variant (memory
format, autocast dtype) and report its error against the contiguous fp32 reference.

Reads `{"batch", "threads", "convs": [ConvSpec as dict], "variants": [{"channels_last", "amp"}]}` as JSON on
stdin. For each variant and convolution it prints `{"variant": i, "conv": j}` before running it and
`{"variant": i, "conv": j, "error": e}` after (flushed), so a crash or a hang names the kernel it happened in.
`e` is the largest of max|out - ref| / max|ref| over the output and (for a trained convolution) the input,
weight and bias gradients.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(conv: dict[str, Any], batch: int, seed: int) -> dict[str, Tensor | None]:
    """Random input, weight, bias (or None) and incoming gradient for `conv`, the same for every variant."""
    g = torch.Generator().manual_seed(seed)
    c_in, c_out, groups = conv["in_channels"], conv["out_channels"], conv["groups"]
    kh, kw = conv["kernel"]
    x = torch.randn(batch, c_in, conv["height"], conv["width"], generator=g)
    w = torch.randn(c_out, c_in // groups, kh, kw, generator=g) / (c_in // groups * kh * kw) ** 0.5
    b = torch.randn(c_out, generator=g) if conv["bias"] else None
    with torch.no_grad():
        y = F.conv2d(x, w, b, conv["stride"], conv["padding"], conv["dilation"], groups)
    return {"x": x, "w": w, "b": b, "gy": torch.randn(y.shape, generator=g)}


def conv_outputs(conv: dict[str, Any], inputs: dict[str, Tensor | None], channels_last: bool,
                 amp: str) -> dict[str, Tensor]:
    """The convolution's output (and, if `conv["backward"]`, its gradients) as training would compute them:
    tensors in the asked memory format, under autocast to `amp`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = inputs["x"].contiguous(memory_format=fmt).requires_grad_(conv["backward"])
    w = inputs["w"].contiguous(memory_format=fmt).requires_grad_(conv["backward"])
    b = inputs["b"].clone().requires_grad_(conv["backward"]) if inputs["b"] is not None else None
    cast = torch.autocast("cpu", dtype=DTYPES[amp]) if amp != "fp32" else contextlib.nullcontext()
    with torch.set_grad_enabled(conv["backward"]), cast:
        y = F.conv2d(x, w, b, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    out = {"out": y.float()}
    if conv["backward"]:
        params = [x, w] + ([b] if b is not None else [])
        grads = torch.autograd.grad(y, params, inputs["gy"].to(y.dtype).contiguous(memory_format=fmt))
        out.update(zip(("grad_input", "grad_weight", "grad_bias"), (g.float() for g in grads)))
    return out


def relative_error(got: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """The largest max|got - ref| / max|ref| over the tensors (inf for a non-finite one)."""
    worst = 0.0
    for name, r in ref.items():
        diff = (got[name] - r).abs().max().item()
        worst = max(worst, diff / max(r.abs().max().item(), 1e-12))
    return worst if worst == worst else float("inf")  # NaN: a kernel wrote garbage


def main() -> None:
    job = json.load(sys.stdin)
    torch.set_num_threads(job["threads"])
    refs = []
    for j, conv in enumerate(job["convs"]):
        inputs = make_inputs(conv, job["batch"], j)
        refs.append((inputs, conv_outputs(conv, inputs, channels_last=False, amp="fp32")))
    for i, variant in enumerate(job["variants"]):
        for j, conv in enumerate(job["convs"]):
            print(json.dumps({"variant": i, "conv": j}), flush=True)
            inputs, ref = refs[j]
            got = conv_outputs(conv, inputs, variant["channels_last"], variant["amp"])
            print(json.dumps({"variant": i, "conv": j, "error": relative_error(got, ref)}), flush=True)


if __name__ == "__main__":
    main()
