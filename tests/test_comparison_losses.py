"""AT, FitNets and RKD against their float64 references; their errors; a CD + AT run that learns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastcd.config import load_config
from fastcd.errors import FastcdError
from fastcd.losses import ATLoss, FitNetLoss, RKDLoss, build_loss
from fastcd.losses.reference import at_reference, fitnet_reference, rkd_reference

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STU_CHANNELS, TEA_CHANNELS, SIDES = (3, 5, 7, 9), (5, 9, 11, 13), (9, 5, 3, 2)
DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype, expected: torch.Tensor) -> dict[str, float]:
    """rtol/atol for comparing with a float64 result; bf16 gradients are rounded to 8 mantissa bits."""
    rtol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}[dtype]
    return {"rtol": rtol, "atol": rtol * float(expected.detach().abs().max()) + 1e-12}


def features(n: int, channels: tuple[int, ...], dtype: torch.dtype, grad: bool) -> list[torch.Tensor]:
    """Post-ReLU-like stage outputs of `channels`, spatial SIDES, as leaves of `dtype`."""
    return [torch.randn(n, c, s, s).relu_().add_(0.05).to(dtype).requires_grad_(grad)
            for c, s in zip(channels, SIDES, strict=True)]


def as_double_leaves(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.detach().double().requires_grad_(True) for x in xs]


def check_against_reference(loss: torch.Tensor, ref: torch.Tensor, stu: list[torch.Tensor],
                            stu64: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Values, then gradients under an incoming gradient that is not 1."""
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, **tolerance(torch.float32, ref))
    g = float(torch.rand(()) * 3 + 0.5)
    (loss * g).backward()
    (ref * g).backward()
    for x, x64 in zip(stu, stu64, strict=True):
        if x64.grad is None:  # an input the loss does not read (FitNets' other stages)
            assert x.grad is None
            continue
        assert x.grad is not None and x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.double(), x64.grad, **tolerance(dtype, x64.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_at_matches_reference(n: int, dtype: torch.dtype) -> None:
    stu, tea = features(n, STU_CHANNELS, dtype, True), features(n, TEA_CHANNELS, dtype, False)
    stu64 = as_double_leaves(stu)
    loss = ATLoss()(stu, tea)
    check_against_reference(loss, at_reference(stu64, [t.double() for t in tea]), stu, stu64, dtype)


def test_at_is_zero_for_proportional_features() -> None:
    """The maps are normalised: a teacher that is the student scaled (and with other channels) gives 0."""
    stu = features(2, STU_CHANNELS, torch.float32, False)
    tea = [torch.cat([s * 3.0, s * 3.0], dim=1) for s in stu]
    assert float(ATLoss()(stu, tea)) < 1e-10


def test_at_spatial_mismatch_names_both_sizes() -> None:
    stu, tea = features(2, STU_CHANNELS, torch.float32, False), features(2, TEA_CHANNELS, torch.float32, False)
    tea[1] = torch.rand(2, TEA_CHANNELS[1], 4, 6)
    with pytest.raises(FastcdError, match=r"stage 2 .*student \(5, 5\), teacher \(4, 6\)"):
        ATLoss()(stu, tea)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "stage"), [(1, 3), (3, 1), (2, 4)])
def test_fitnet_matches_reference(n: int, stage: int, dtype: torch.dtype) -> None:
    conn, tea = features(n, TEA_CHANNELS, dtype, True), features(n, TEA_CHANNELS, dtype, False)
    conn64 = as_double_leaves(conn)
    loss = build_loss("FitNetLoss", {"stage": stage})(conn, tea)
    check_against_reference(loss, fitnet_reference(conn64, [t.double() for t in tea], stage), conn, conn64, dtype)


def test_fitnet_reads_only_its_stage() -> None:
    """Default stage 3 = layer3 (1-based): other stages neither change the value nor get gradients."""
    conn, tea = features(2, TEA_CHANNELS, torch.float32, True), features(2, TEA_CHANNELS, torch.float32, False)
    loss_fn = FitNetLoss()
    assert loss_fn.stage == 3 and loss_fn.connector_stages() == (2,)
    loss = loss_fn(conn, tea)
    others = [0, 1, 3]
    changed = [t if i == 2 else torch.rand_like(t) for i, t in enumerate(tea)]
    torch.testing.assert_close(loss_fn(conn, changed), loss)
    loss.backward()
    assert conn[2].grad is not None and conn[2].grad.abs().sum() > 0
    assert all(conn[i].grad is None for i in others)


@pytest.mark.parametrize("stage", [0, 5, "3", 2.5, True])
def test_fitnet_rejects_bad_stage(stage: object) -> None:
    with pytest.raises(FastcdError, match="stage must be an integer from 1 to 4"):
        FitNetLoss(stage)  # type: ignore[arg-type]


def test_fitnet_shape_mismatch_is_an_error() -> None:
    conn, tea = features(2, TEA_CHANNELS, torch.float32, False), features(2, STU_CHANNELS, torch.float32, False)
    with pytest.raises(FastcdError, match=r"stage 3 connector output \(2, 11, 3, 3\) .* \(2, 7, 3, 3\)"):
        FitNetLoss()(conn, tea)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "weights"), [(1, (25.0, 50.0)), (3, (25.0, 50.0)), (9, (25.0, 50.0)),
                                             (6, (1.5, 0.0)), (6, (0.0, 2.0))])
def test_rkd_matches_reference(n: int, weights: tuple[float, float], dtype: torch.dtype) -> None:
    stu = torch.randn(n, 7).to(dtype).requires_grad_(True)
    tea = (torch.randn(n, 13) * 4).to(dtype)
    stu64 = stu.detach().double().requires_grad_(True)
    loss = RKDLoss(*weights)(stu, tea)
    check_against_reference(loss, rkd_reference(stu64, tea.double(), *weights), [stu], [stu64], dtype)


def test_rkd_defaults_are_the_papers() -> None:
    loss_fn = build_loss("RKDLoss", {})
    assert (loss_fn.distance_weight, loss_fn.angle_weight) == (25.0, 50.0)


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(1, 6), torch.randn(1, 4)),                # one sample: no pair
    lambda: (torch.randn(2, 6), torch.randn(2, 4)),                # one pair: its normalised distance is 1
    lambda: (torch.randn(1, 6).expand(4, 6), torch.randn(4, 4)),   # all samples identical
    lambda: (torch.zeros(3, 6), torch.zeros(3, 4)),                # all zero
], ids=["batch1", "batch2", "identical", "zeros"])
def test_rkd_degenerate_batches_are_finite(make) -> None:  # type: ignore[no-untyped-def]
    stu, tea = make()
    stu = stu.clone().requires_grad_(True)
    loss = RKDLoss()(stu, tea)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stu.grad).all()
    if stu.shape[0] <= 2:
        assert float(loss.detach()) < 1e-6
        assert float(stu.grad.abs().max()) < 1e-5


@pytest.mark.parametrize(("folder", "stem"), [("imagenet", "s_resnet18.t_resnet34."),
                                              ("fashion-mnist", "s_resnet18.t_resnet34.")])
@pytest.mark.parametrize(("method", "loss_name", "rate"), [("at", "ATLoss", 1000.0), ("fitnets", "FitNetLoss", 100.0),
                                                           ("rkd", "RKDLoss", 1.0)])
def test_method_configs_load(folder: str, stem: str, method: str, loss_name: str, rate: float) -> None:
    cfg = load_config(CONFIGS / folder / f"{stem}{method}.yaml")
    assert [s.loss_name for s in cfg.loss_list] == ["CELoss", loss_name]
    spec = cfg.loss_list[1]
    assert (spec.loss_rate, spec.loss_type) == (rate, "fd_family")
    build_loss(spec.loss_name, spec.params)


def test_losses_keep_fp32_under_autocast() -> None:
    """The engine calls losses inside autocast: their results must not drop to bf16 matmuls."""
    stu, tea = features(4, TEA_CHANNELS, torch.float32, False), features(4, TEA_CHANNELS, torch.float32, False)
    es, et = torch.randn(16, 32), torch.randn(16, 24)
    calls = [lambda: ATLoss()(stu, tea), lambda: FitNetLoss()(stu, tea), lambda: RKDLoss()(es, et)]
    for call in calls:
        plain = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = call()
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=0.0)


def tiny_run(tmp_path: Path, loss_list: list[dict]) -> list[dict]:
    """Three 3-step epochs of a width-1/8 R34 -> R18 pair on synthetic data, on the CPU in fp32."""
    from fastcd.config import config_from_dict
    from fastcd.engine.trainer import train

    raw = {
        "name": "comparison-smoke",
        "student": {"arch": "resnet18", "stem": "cifar", "width": 0.125, "num_classes": 4},
        "teacher": {"arch": "resnet34", "stem": "cifar", "width": 0.125, "num_classes": 4, "weights": "none"},
        "loss_list": loss_list,
        "data": {"backend": "synthetic", "batch_size": 32, "workers": 0, "res": 16, "val_res": 16,
                 "train_subset": 96, "val_subset": 32},
        "optim": {"lr": 0.05, "schedule": "step", "step_size": 100},
        "train": {"epochs": 3, "device": "cpu", "amp": "fp32", "out_dir": str(tmp_path), "progress": False},
    }
    return train(config_from_dict(raw))


CE = {"loss_name": "CELoss", "loss_rate": 1, "loss_type": "ce_family"}


def test_cd_and_at_train_together(tmp_path: Path) -> None:
    history = tiny_run(tmp_path, [CE, {"loss_name": "CDLoss", "loss_rate": 6, "loss_type": "fd_family"},
                                  {"loss_name": "ATLoss", "loss_rate": 1000, "loss_type": "fd_family"}])
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"]
    assert last["losses"][2] < first["losses"][2]  # the AT term itself falls


def test_fitnets_and_rkd_train_together(tmp_path: Path) -> None:
    """FitNets uses one connector of four (only that one is built), RKD the embeddings: both run in the engine."""
    history = tiny_run(tmp_path, [CE, {"loss_name": "FitNetLoss", "stage": 3, "loss_rate": 100,
                                       "loss_type": "fd_family"},
                                  {"loss_name": "RKDLoss", "loss_rate": 1, "loss_type": "fd_family"}])
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)["connectors"]
    assert {key.split(".")[0] for key in saved} == {"2"}  # layer3's connector only
