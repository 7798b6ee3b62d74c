"""Eager losses against the float64 references of DESIGN.md's formulas, values and gradients."""
import pytest
import torch

from fastcd.losses import CDLoss, CELoss, KDLoss, KDLossv2, build_loss
from fastcd.losses.reference import cd_reference, ce_reference, gkd_reference, kd_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _grad_check(fn_ours, fn_ref, inputs, rtol):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    ref_leaves = [x.detach().double().requires_grad_(True) for x in inputs]
    ours, ref = fn_ours(*leaves), fn_ref(*ref_leaves)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=rtol, atol=rtol)
    g = torch.rand(()) + 0.5  # an incoming gradient that is not 1
    ours.backward(g)
    (ref * g).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol * 10, atol=rtol)


@pytest.mark.parametrize("n,k", [(1, 3), (7, 10), (33, 1000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce(n, k, smoothing):
    s, y = torch.randn(n, k) * 3, torch.randint(0, k, (n,))
    _grad_check(lambda a: CELoss(smoothing)(a, y), lambda a: ce_reference(a, y, smoothing), [s], 1e-5)


@pytest.mark.parametrize("n,k,T", [(1, 5, 1.0), (9, 10, 4.0), (16, 1000, 2.0)])
def test_kd(n, k, T):
    s, t = torch.randn(n, k) * 3, torch.randn(n, k) * 3
    _grad_check(lambda a: KDLoss(T)(a, t), lambda a: kd_reference(a, t.double(), T), [s], 1e-5)


@pytest.mark.parametrize("n,k,T", [(1, 5, 1.0), (12, 10, 4.0), (31, 1000, 1.0)])
def test_gkd(n, k, T):
    s, t = torch.randn(n, k) * 3, torch.randn(n, k) * 3
    y = torch.where(torch.rand(n) < 0.5, t.argmax(1), torch.randint(0, k, (n,)))
    _grad_check(lambda a: KDLossv2(T)(a, t, y), lambda a: gkd_reference(a, t.double(), y, T), [s], 1e-5)


def test_gkd_without_a_correct_teacher_sample_is_zero_not_nan():
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    y = (t.argmax(1) + 1) % 4  # the teacher is wrong everywhere
    loss = KDLossv2(2.0)(s, t, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cd(dtype, channels_last):
    shapes = [(3, 5, 9, 7), (3, 11, 5, 4), (3, 17, 3, 3), (3, 2, 1, 1)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    s = [torch.randn(*sh).to(dtype=dtype, memory_format=fmt) for sh in shapes]
    t = [torch.randn(sh[0], sh[1], max(1, sh[2] // 2), sh[3]).to(dtype=dtype, memory_format=fmt) for sh in shapes]
    t_ref = [x.double() for x in t]
    _grad_check(lambda *a: CDLoss()(list(a), t), lambda *a: cd_reference(list(a), t_ref), s, TOL[dtype])


def test_registry_resolves_seed_names_and_rejects_unknown():
    assert isinstance(build_loss("KDLossv2", {"T": 3}), KDLossv2)
    with pytest.raises(Exception, match="did you mean 'CDLoss'"):
        build_loss("CDloss", {})
    with pytest.raises(Exception, match="no parameter 'temperature'"):
        build_loss("KDLoss", {"temperature": 3})


def _float64_cases():
    from fastcd.losses import ATLoss, FitNetLoss, RKDLoss
    from fastcd.losses.reference import at_reference, fitnet_reference, rkd_reference

    torch.manual_seed(0)
    s, t = torch.randn(6, 10, dtype=torch.float64) * 3, torch.randn(6, 10, dtype=torch.float64) * 3
    y = torch.where(torch.rand(6) < 0.5, t.argmax(1), torch.randint(0, 10, (6,)))
    fs = [torch.randn(3, c, h, h, dtype=torch.float64).relu() + 0.01 for c, h in ((4, 5), (6, 3))]
    ft = [torch.randn(3, c, h, h, dtype=torch.float64).relu() + 0.01 for c, h in ((4, 5), (6, 3))]
    es, et = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    return {
        "CE": (CELoss(0.1)(s, y), ce_reference(s, y, 0.1)),
        "KD": (KDLoss(2.0)(s, t), kd_reference(s, t, 2.0)),
        "GKD": (KDLossv2(2.0)(s, t, y), gkd_reference(s, t, y, 2.0)),
        "CD": (CDLoss()(fs, ft), cd_reference(fs, ft)),
        "AT": (ATLoss()(fs, ft), at_reference(fs, ft)),
        "FitNets": (FitNetLoss(stage=2)(fs, ft), fitnet_reference(fs, ft, 2)),
        "RKD": (RKDLoss()(es, et), rkd_reference(es, et)),
    }


def test_float64_inputs_are_computed_in_float64():
    """Losses promote to at least fp32 and never demote: float64 in, float64 out, to the reference's precision."""
    for name, (ours, ref) in _float64_cases().items():
        assert ours.dtype == torch.float64, name
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("name,params,message", [
    ("KDLoss", {"T": 0}, "KDLoss: T must be > 0"),
    ("KDLossv2", {"T": -1}, "KDLossv2: T must be > 0"),
    ("CELoss", {"label_smoothing": 1.5}, "CELoss: label_smoothing must be in [0, 1]"),
    ("RKDLoss", {"angle_weight": -1}, "RKDLoss: angle_weight must be >= 0"),
])
def test_loss_parameters_out_of_range_are_one_line_errors(name, params, message):
    from fastcd.errors import FastcdError

    with pytest.raises(FastcdError) as info:
        build_loss(name, params)
    assert message in str(info.value)
