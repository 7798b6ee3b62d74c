"""Loss-rate decay against DESIGN.md's formulas, milestone scaling, and the lr schedules."""
import math
import random

import pytest

from fastcd.config import OptimConfig
from fastcd.schedules import adjust_loss_alpha, lr_factor


def design_formula(alpha, e, factor, loss_type, decay, dataset):
    """DESIGN.md, literally (100-epoch ImageNet, 200-epoch CIFAR runs)."""
    teacherish = "ce" in loss_type or "kd" in loss_type
    if dataset == "imagenet":
        if decay == "lrdv1" or not teacherish:
            return alpha * factor ** (e // 30)
        return 0 if e <= 30 else alpha * factor ** (e // 30)
    if decay == "lrdv1":
        return alpha
    k = 2 if e >= 160 else 1 if e >= 60 else 0
    if teacherish:
        return 0 if e <= 60 else alpha * factor**k
    return alpha * factor**k


@pytest.mark.parametrize("dataset,epochs", [("imagenet", 100), ("cifar", 200)])
@pytest.mark.parametrize("loss_type", ["ce_family", "kd_family", "kdv2_family", "fd_family"])
@pytest.mark.parametrize("decay", ["lrdv1", "lrdv2"])
def test_loss_rate_matches_design_on_original_lengths(dataset, epochs, loss_type, decay):
    alpha, factor = random.uniform(0.5, 8), random.uniform(0.5, 0.99)
    for e in range(1, epochs + 1):
        ours = adjust_loss_alpha(alpha, e, factor, loss_type, decay, dataset)
        assert ours == pytest.approx(design_formula(alpha, e, factor, loss_type, decay, dataset)), e
        assert ours == adjust_loss_alpha(alpha, e, factor, loss_type, decay, dataset, epochs=epochs)


@pytest.mark.parametrize("dataset,base", [("imagenet", 100), ("cifar", 200)])
def test_scaled_schedule_keeps_its_shape(dataset, base):
    """A run k times shorter has, at epoch e, the weight the original has at epoch k*e."""
    for k in (2, 4, 5, 10):
        short = base // k
        for e in range(1, short + 1):
            for loss_type in ("ce_family", "fd_family"):
                got = adjust_loss_alpha(6, e, 0.9, loss_type, "lrdv2", dataset, epochs=short)
                assert got == pytest.approx(adjust_loss_alpha(6, e * k, 0.9, loss_type, "lrdv2", dataset))


def test_unknown_preset_is_an_error():
    with pytest.raises(Exception, match="dataset_type"):
        adjust_loss_alpha(1, 1, dataset_type="imagenet21k")


def test_lr_schedules():
    ms = OptimConfig(schedule="multistep", milestones=[30, 60, 90], gamma=0.1)
    assert [lr_factor(ms, e, 100) for e in (0, 29.99, 30, 60, 95)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    st = OptimConfig(schedule="step", step_size=10, gamma=0.5)
    assert lr_factor(st, 25, 100) == pytest.approx(0.25)
    cos = OptimConfig(schedule="cosine", end_lr_ratio=0.0)
    assert lr_factor(cos, 0, 10) == pytest.approx(1) and lr_factor(cos, 5, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 10, 10) == pytest.approx(0, abs=1e-12)
    lin = OptimConfig(schedule="linear", peak_epoch=2, end_lr_ratio=0.0)
    assert [lr_factor(lin, e, 10) for e in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    warm = OptimConfig(schedule="cosine", warmup_epochs=2)
    assert lr_factor(warm, 1, 100) == pytest.approx(0.5 * lr_factor(cos, 1, 100))
    assert not math.isnan(lr_factor(OptimConfig(schedule="linear", peak_epoch=5), 5, 5))
