"""The fused guided-KD kernel (Triton; TRITON_INTERPRET=1 on CPU, set by conftest.py) against the
float64 reference: odd shapes, 1000 classes, ties, the empty mask, three dtypes, poisoned outputs."""
import functools

import pytest
import torch

from fastcd.errors import FastcdError
from fastcd.kernels.gkd_triton import gkd_backward, gkd_forward, gkd_triton
from fastcd.losses.gkd import KDLossv2, gkd_eager
from fastcd.losses.reference import gkd_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
nan_alloc = functools.partial(torch.full, fill_value=float("nan"))
SHAPES = [(3, 1), (1, 1000), (5, 10), (7, 100), (16, 1000), (9, 37)]


def close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Relative to the largest magnitude of `want`."""
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.detach().abs().max()) + 1e-12)


def make_batch(b: int, k: int, dtype: torch.dtype):
    """Fresh logits; about half the labels are the teacher's argmax, the rest random."""
    stu = (torch.randn(b, k, device=DEVICE) * 2).to(dtype).requires_grad_()
    tea = (torch.randn(b, k, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, k, (b,), device=DEVICE)
    hit = torch.rand(b, device=DEVICE) < 0.5
    return stu, tea, torch.where(hit, tea.argmax(dim=1), labels)


def reference(stu, tea, labels, T, grad_out):
    want = stu.detach().double().requires_grad_()
    loss = gkd_reference(want, tea, labels, T)
    loss.backward(grad_out.double())
    return loss, want.grad


@pytest.mark.parametrize("dtype", RTOL)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gkd_triton_matches_reference(shape, dtype):
    stu, tea, labels = make_batch(*shape, dtype)
    T = float(torch.empty(()).uniform_(0.5, 6.0))
    grad_out = torch.rand((), device=DEVICE) + 0.5
    loss = gkd_triton(stu, tea, labels, T)
    loss.backward(grad_out)
    want, want_grad = reference(stu, tea, labels, T, grad_out)
    assert loss.dtype == torch.float32 and loss.shape == ()
    close(loss, want, 1e-5)  # inputs are exact in fp32: only the fp32 arithmetic differs
    assert stu.grad.dtype == dtype
    close(stu.grad, want_grad, RTOL[dtype])


@pytest.mark.parametrize("block_k", [None, 8])
def test_gkd_launchers_write_every_output_and_follow_argmax_ties(block_k):
    """Many tied teacher maxima across class blocks: the first maximal index is the argmax."""
    b, k = 24, 37
    stu = torch.randn(b, k, device=DEVICE)
    tea = torch.randint(0, 3, (b, k), device=DEVICE).float()
    first = tea.argmax(dim=1)
    last = k - 1 - tea.flip(1).argmax(dim=1)
    labels = torch.where(torch.arange(b, device=DEVICE) % 2 == 0, first, last)
    grad_out = torch.rand((), device=DEVICE) + 0.5
    want, want_grad = reference(stu, tea, labels, 2.0, grad_out)
    loss, count, grad = gkd_forward(stu, tea, labels, 2.0, alloc=nan_alloc, block_k=block_k)
    assert count == (tea.argmax(dim=1) == labels).sum()
    close(loss, want, 1e-5)
    close(gkd_backward(grad, count, grad_out, stu.dtype, alloc=nan_alloc, block=64), want_grad, 1e-5)


def test_gkd_empty_mask_gives_zero_and_zero_gradient():
    stu, tea, _ = make_batch(6, 50, torch.float32)
    labels = (tea.argmax(dim=1) + 1) % 50
    loss = gkd_triton(stu, tea, labels, 4.0)
    loss.backward(torch.tensor(2.0, device=DEVICE))
    assert loss.item() == 0.0
    assert torch.equal(stu.grad, torch.zeros_like(stu))


def test_gkd_rows_with_larger_stride():
    """Rows of a wider buffer (row stride > K) are read in place."""
    wide_s, wide_t = torch.randn(5, 64, device=DEVICE), torch.randn(5, 64, device=DEVICE)
    stu, tea = wide_s[:, :40].requires_grad_(), wide_t[:, :40]
    labels = tea.argmax(dim=1)
    gkd_triton(stu, tea, labels, 3.0).backward()
    want, want_grad = reference(stu, tea, labels, 3.0, torch.tensor(1.0, device=DEVICE))
    close(stu.grad, want_grad, 1e-5)


def test_gkd_bad_inputs_are_clear_errors():
    stu, tea, labels = make_batch(4, 10, torch.float32)
    stu = stu.detach()
    cases = {
        "contiguous classes": (stu.t().contiguous().t()[:, ::2], tea[:, ::2], labels, 1.0),
        "do not match": (stu, tea[:3], labels, 1.0),
        "labels must be an integer tensor": (stu, tea, labels.float(), 1.0),
        "T must be > 0": (stu, tea, labels, 0.0),
        "2-D": (stu[0], tea[0], labels, 1.0),
    }
    for message, args in cases.items():
        with pytest.raises(FastcdError, match=message):
            gkd_forward(*args)
    with pytest.raises(FastcdError, match="teacher"):
        gkd_triton(stu, tea.requires_grad_(), labels, 1.0)


@pytest.mark.parametrize("impl", ["auto", "triton", "eager"])
def test_gkd_dispatch_gives_the_eager_values_and_gradients(impl):
    stu, tea, labels = make_batch(8, 100, torch.float32)
    grad_out = torch.rand((), device=DEVICE) + 0.5
    loss = KDLossv2(T=4.0, impl=impl)(stu, tea, labels)
    loss.backward(grad_out)
    want = stu.detach().clone().requires_grad_()
    want_loss = gkd_eager(want, tea, labels, 4.0)
    want_loss.backward(grad_out)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stu.grad, want.grad, rtol=1e-5, atol=1e-5 * float(want.grad.abs().max()))


@pytest.mark.parametrize("impl", ["cuda", "fast"])
def test_gkd_dispatch_rejects_unknown_impls(impl):
    with pytest.raises(FastcdError, match=f"unknown impl '{impl}'; choose from auto, triton, eager"):
        KDLossv2(T=4.0, impl=impl)
