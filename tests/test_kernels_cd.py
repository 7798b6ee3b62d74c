"""The fused CD kernels (Triton; TRITON_INTERPRET=1 on CPU, set by conftest.py), which read the student's
maps and the teacher's channel means, against the float64 reference over both sides' maps: odd shapes,
both layouts, three dtypes, values and gradients, poisoned outputs."""
import functools

import pytest
import torch

from fastcd.errors import FastcdError
from fastcd.kernels.cd_triton import cd_forward, cd_triton
from fastcd.losses.cd import CDLoss, cd_eager, teacher_means
from fastcd.losses.reference import cd_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
nan_alloc = functools.partial(torch.full, fill_value=float("nan"))

# Stage lists: odd channel counts, batch 1, 1x1 and 7x7 maps; then two large maps (kept small in N, C).
SMALL = [(2, 5, 7, 7), (1, 3, 1, 1), (3, 17, 4, 6), (2, 64, 2, 3)]
LARGE = [(1, 3, 56, 56), (2, 8, 28, 28)]
LAYOUTS = ("nchw", "channels_last")


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the largest magnitude of `want` (gradients can be tiny in half precision)."""
    rtol = RTOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.detach().abs().max()) + 1e-12)


def make_maps(shapes, dtype, layout, grad=True):
    """Fresh random student/teacher maps, with per-channel offsets so the means differ."""
    stu, tea = [], []
    for shape in shapes:
        s = torch.randn(shape, device=DEVICE) + torch.randn(shape[:2] + (1, 1), device=DEVICE)
        t = torch.randn(shape, device=DEVICE)
        if layout != "nchw":
            s = s.to(memory_format=torch.channels_last)
            t = t.to(memory_format=torch.channels_last)
        stu.append(s.to(dtype).requires_grad_(grad))
        tea.append(t.to(dtype))
    return stu, tea


def reference_grads(stu, tea, grad_out):
    want = [s.detach().double().requires_grad_() for s in stu]
    loss = cd_reference(want, tea)
    loss.backward(grad_out.double())
    return loss, [w.grad for w in want]


@pytest.mark.parametrize("dtype", RTOL)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes", [SMALL, LARGE], ids=["small", "large"])
def test_cd_triton_matches_reference(shapes, layout, dtype):
    stu, tea = make_maps(shapes, dtype, layout)
    grad_out = torch.rand((), device=DEVICE) + 0.5
    loss = cd_triton(stu, teacher_means(tea))
    loss.backward(grad_out)
    want, want_grads = reference_grads(stu, tea, grad_out)
    assert loss.dtype == torch.float32 and loss.shape == ()
    close(loss, want, torch.float32)  # inputs are exact in fp32: only the fp32 accumulation differs
    for s, g, w in zip(stu, [s.grad for s in stu], want_grads, strict=True):
        assert g.dtype == s.dtype
        for layout in (torch.contiguous_format, torch.channels_last):
            assert g.is_contiguous(memory_format=layout) or not s.is_contiguous(memory_format=layout)
        close(g, w, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cd_launcher_writes_every_output(layout):
    """Outputs start as NaN; small blocks force several channel tiles and H*W loop steps."""
    stu, tea = make_maps(SMALL, torch.float32, layout, grad=False)
    want, _ = reference_grads(stu, tea, torch.ones((), device=DEVICE))
    for blocks in (None, (2, 4)):
        loss, diffs = cd_forward(stu, teacher_means(tea), alloc=nan_alloc, blocks=blocks)
        close(loss, want, torch.float32)
        for d, s, t in zip(diffs, stu, tea, strict=True):
            close(d, s.double().mean(dim=(2, 3)) - t.double().mean(dim=(2, 3)), torch.float32)


def test_cd_gradient_is_the_differences_expanded_with_no_map_written():
    """The backward writes no (N, C, H, W) map: each student gradient is a broadcast of (N, C) values, and
    a layer after it (the connector's ReLU) gets the right values through it."""
    stu, tea = make_maps(SMALL, torch.float32, "channels_last")
    inner = [s * 1.0 for s in stu]  # non-leaf maps, as the connectors' outputs are
    grads = torch.autograd.grad(cd_triton(inner, teacher_means(tea)), inner)
    _, want = reference_grads(stu, tea, torch.ones((), device=DEVICE))
    for g, w in zip(grads, want, strict=True):
        assert all(st == 0 for st, size in zip(g.stride()[2:], g.shape[2:]) if size > 1)  # expanded, not written
        close(g, w, torch.float32)


def test_cd_teacher_gets_no_gradient_and_frozen_teacher_is_required():
    stu, tea = make_maps(SMALL[:2], torch.float32, "nchw")
    with pytest.raises(FastcdError, match="teacher"):
        cd_triton(stu, [m.requires_grad_() for m in teacher_means(tea)])
    with torch.no_grad():
        close(cd_triton(stu, teacher_means(tea)), cd_reference(stu, tea), torch.float32)


def test_cd_bad_inputs_are_clear_errors():
    stu, tea = make_maps(SMALL[:2], torch.float32, "nchw", grad=False)
    m = teacher_means(tea)
    cases = {
        "neither NCHW-contiguous nor channels_last": ([stu[0][:, :, ::2], stu[1]], m),
        r"must be \(N, C\)": (stu, [m[1], m[0]]),
        "means of every student stage": (stu, m[:1]),
        "4-D": ([stu[0][0], stu[1]], m),
        "float32/float16/bfloat16": ([s.double() for s in stu], m),
    }
    for message, (s, t) in cases.items():
        with pytest.raises(FastcdError, match=message):
            cd_forward(s, t)


@pytest.mark.parametrize("impl", ["auto", "triton", "eager"])
def test_cd_dispatch_gives_the_eager_values_and_gradients(impl):
    stu, tea = make_maps(SMALL, torch.float32, "channels_last")
    grad_out = torch.rand((), device=DEVICE) + 0.5
    CDLoss(impl=impl)(stu, tea).backward(grad_out)
    got = [s.grad for s in stu]
    want = [s.detach().clone().requires_grad_() for s in stu]
    want_loss = cd_eager(want, teacher_means(tea))
    want_loss.backward(grad_out)
    torch.testing.assert_close(CDLoss(impl=impl)(stu, tea), want_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(CDLoss(impl=impl)(stu, teacher_means(tea)), want_loss, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.grad, rtol=1e-5, atol=1e-5 * float(w.grad.abs().max()))


def test_cd_dispatch_rejects_unknown_and_unbuilt_impls(monkeypatch):
    with pytest.raises(FastcdError, match="unknown impl 'fast'"):
        CDLoss(impl="fast")
    monkeypatch.delenv("FASTCD_CUDA_JIT", raising=False)
    try:
        from fastcd.kernels import _cd_cuda  # noqa: F401
    except ImportError:
        with pytest.raises(FastcdError, match="FASTCD_BUILD_CUDA=1"):
            CDLoss(impl="cuda")


def test_auto_takes_the_fastest_kernel_that_can_run():
    """On CUDA maps `auto` is the C++ kernel where it can run (the fastest on an H200), else Triton;
    eager elsewhere; an explicit choice stays."""
    from fastcd.kernels.dispatch import resolve_impl

    class OnCuda:
        is_cuda = True

    assert resolve_impl("auto", OnCuda(), cuda_ok=True) == "cuda"
    assert resolve_impl("auto", OnCuda()) == "triton"
    assert resolve_impl("auto", torch.zeros(1), cuda_ok=True) == "eager"
    assert resolve_impl("triton", OnCuda(), cuda_ok=True) == "triton"


def test_the_kernel_benchmark_times_only_a_loss_that_matches_the_reference():
    from fastcd.bench.kernels import measure

    x = torch.randn(64, requires_grad=True)
    right = float((x.detach().double() ** 2).sum())
    ok = measure(lambda: (x**2).sum(), [x], 256, torch.device("cpu"), 0.0, reference=right)
    assert ok["status"] == "ok" and ok["rel_err"] < 1e-5 and ok["ms"] > 0
    wrong = measure(lambda: (x**2).sum(), [x], 256, torch.device("cpu"), 0.0, reference=right * 1.01)
    assert wrong["status"] == "wrong" and "ms" not in wrong
