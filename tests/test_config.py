"""Config loading: every shipped config, inheritance, overrides, and one-line errors for typos."""
from pathlib import Path

import pytest

from fastcd.config import config_from_dict, load_config
from fastcd.errors import FastcdError

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/*/*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.loss_list and cfg.name


def test_seed_loss_dicts_are_accepted_verbatim():
    seed = [{"loss_name": "CELoss", "loss_rate": 1, "factor": 1, "loss_type": "ce_family", "loss_rate_decay": "lrdv2"},
            {"loss_name": "KDLossv2", "T": 1, "loss_rate": 1, "factor": 1, "loss_type": "kdv2_family",
             "loss_rate_decay": "lrdv2"},
            {"loss_name": "CDLoss", "loss_rate": 6, "factor": 0.9, "loss_type": "fd_family",
             "loss_rate_decay": "lrdv2"}]
    cfg = config_from_dict({"loss_list": seed})
    as_floats = [{**d, "loss_rate": float(d["loss_rate"]), "factor": float(d["factor"])} for d in seed]
    assert cfg.to_dict()["loss_list"] == as_floats
    assert cfg.loss_list[1].params == {"T": 1}


def test_overrides_reach_any_field():
    cfg = config_from_dict({}, ["train.epochs=7", "data.batch_size=32", "loss_list.0.loss_rate=2.5",
                                "teacher=null", "optim.milestones=[1, 2]"])
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.loss_list[0].loss_rate) == (7, 32, 2.5)
    assert cfg.teacher is None and cfg.optim.milestones == [1, 2]


def test_base_inheritance_merges_mappings(tmp_path):
    (tmp_path / "_base.yaml").write_text("data: {batch_size: 64, res: 160}\ntrain: {epochs: 9}\n")
    (tmp_path / "run.yaml").write_text("base: _base.yaml\ndata: {res: 192}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.data.batch_size, cfg.data.res, cfg.train.epochs) == (64, 192, 9)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(FastcdError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("raw,overrides,message", [
    ({"trian": {}}, [], "unknown config key 'trian' (did you mean 'train'?)"),
    ({}, ["data.bacth_size=3"], "unknown config key 'data.bacth_size' (did you mean 'batch_size'?)"),
    ({}, ["data.backend=dail"], "(did you mean 'dali'?)"),
    ({}, ["train.epochs=many"], "train.epochs: expected an integer"),
    ({"loss_list": [{"loss_name": "CDLos"}]}, [], "unknown loss_name 'CDLos' (did you mean 'CDLoss'?)"),
    ({"loss_list": [{"loss_name": "KDLoss", "t": 4}]}, [], "(did you mean 'T'?)"),
    ({"teacher": None, "loss_list": [{"loss_name": "CDLoss"}]}, [], "needs a teacher but teacher is null"),
    ({}, ["loss_list.5.T=1"], "not an index"),
])
def test_bad_configs_name_the_problem(raw, overrides, message):
    with pytest.raises(FastcdError) as info:
        config_from_dict(raw, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FastcdError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(FastcdError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("text,where", [
    ("name: x\ntrain:\n  epochs: 3\n   seed: 1\n", "line 4, column 8: mapping values are not allowed here"),
    ("name: x\ndata: {path: a\n", "line 3, column 1: expected ',' or '}', but got '<stream end>'"),
    ("a: 'open\n", "line 2, column 1: found unexpected end of stream"),
])
def test_a_yaml_syntax_error_keeps_its_line_and_column(tmp_path, text, where):
    """The error used to keep only the first line of PyYAML's message, which has no position."""
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(FastcdError) as info:
        load_config(tmp_path / "bad.yaml")
    assert where in str(info.value) and "\n" not in str(info.value)


def test_an_override_that_is_not_yaml_is_a_one_line_error():
    with pytest.raises(FastcdError, match=r"--set 'optim.milestones=\[30, 60': the value is not valid YAML at line 1"):
        config_from_dict({}, ["optim.milestones=[30, 60"])


def test_a_field_inside_a_null_section_is_an_error_naming_it():
    """`--set teacher.x=...` on a student-only config used to create a default ResNet-34 teacher."""
    baseline = Path(__file__).resolve().parents[1] / "configs/imagenet/s_resnet18.baseline.yaml"
    with pytest.raises(FastcdError) as info:
        load_config(baseline, ["teacher.fold_bn=true"])
    assert "teacher is null" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FastcdError, match="optim.fused is null"):
        config_from_dict({}, ["optim.fused.x=1"])
    whole = config_from_dict({"teacher": None}, ["teacher={arch: resnet34, weights: none}", "teacher.fold_bn=true"])
    assert whole.teacher.fold_bn and whole.teacher.weights == "none"


def test_overrides_into_null_sections_can_be_dropped_for_shared_lists():
    from fastcd.config import drop_overrides_into_null

    baseline = Path(__file__).resolve().parents[1] / "configs/imagenet/s_resnet18.baseline.yaml"
    shared = ["teacher.width=0.5", "student.width=0.5", "teacher=null", "teacher.arch=resnet18"]
    assert drop_overrides_into_null(baseline, shared) == ["student.width=0.5", "teacher=null"]
    distilled = baseline.with_name("s_resnet18.t_resnet34.cd.ce.yaml")
    assert drop_overrides_into_null(distilled, shared[:2]) == shared[:2]


def test_set_takes_several_pairs_in_every_command():
    import argparse
    import importlib

    for module in ("fastcd.commands.train", "fastcd.commands.evaluate", "fastcd.commands.demo",
                   "fastcd.commands.repro", "fastcd.bench.train"):
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        positional = {"fastcd.commands.repro": ["fashion-mnist"], "fastcd.commands.demo": []}.get(module, ["c.yaml"])
        extra = ["--checkpoint", "x.pt"] if module.endswith("evaluate") else []
        args = parser.parse_args([*positional, *extra, "--set", "a=1", "b=2", "--set", "c=3"])
        assert args.overrides == ["a=1", "b=2", "c=3"], module


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-0.1", "optim.lr must be > 0, got -0.1"),
    ("optim.momentum=1.5", "optim.momentum must be in [0, 1)"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("optim.gamma=0", "optim.gamma must be > 0"),
    ("optim.step_size=0", "optim.step_size must be >= 1"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
    ("optim.end_lr_ratio=2", "optim.end_lr_ratio must be in [0, 1]"),
    ("optim.milestones=[-3]", "optim.milestones[0] must be >= 0"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("optim.lr=.inf", "optim.lr: expected a finite number"),
    ("train.seed=9223372036854775808", "train.seed must be in [0, 2147483647]"),
    ("train.seed=-1", "train.seed must be in [0, 2147483647]"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("data.val_batch_size=-1", "data.val_batch_size must be >= 0"),
    ("data.workers=-2", "data.workers must be >= 0"),
    ("data.res=0", "data.res must be >= 1"),
    ("data.scale_min=0", "data.scale_min must be in (0, 1]"),
    ("data.val_resize_ratio=1.5", "data.val_resize_ratio must be in (0, 1]"),
    ("data.std=[1, 0, 1]", "data.std[1] must be > 0"),
    ("data.train_subset=-5", "data.train_subset must be >= 0"),
    ("data.dali_hw_decoder_load=2", "data.dali_hw_decoder_load must be in [0, 1]"),
    ("student.width=0", "student.width must be > 0"),
    ("student.num_classes=0", "student.num_classes must be >= 1"),
    ("teacher.width=-1", "teacher.width must be > 0"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch must be >= 0"),
    ("loss_list.0.loss_rate=-1", "loss_list[0].loss_rate must be >= 0"),
    ("loss_list.0.factor=-0.5", "loss_list[0].factor must be >= 0"),
])
def test_numeric_fields_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(FastcdError) as info:
        config_from_dict({}, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_negative_learning_rate_is_a_one_line_cli_error(tmp_path, capsys):
    from fastcd.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("teacher: null\ndata: {backend: synthetic}\n")
    assert main(["train", str(path), "--set", "optim.lr=-0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr must be > 0" in err and err.count("\n") == 1


def test_loss_type_defaults_to_the_loss_family_and_a_contradiction_is_an_error():
    from fastcd.engine.trainer import loss_weights

    cfg = config_from_dict({"loss_list": [{"loss_name": "CELoss"}, {"loss_name": "KDLossv2"}, {"loss_name": "KDLoss"},
                                          {"loss_name": "CDLoss", "loss_rate": 6, "loss_rate_decay": "lrdv2"},
                                          {"loss_name": "ATLoss"}, {"loss_name": "FitNetLoss"},
                                          {"loss_name": "RKDLoss"}]})
    assert [s.loss_type for s in cfg.loss_list] == ["ce_family", "kdv2_family", "kd_family"] + ["fd_family"] * 4
    assert loss_weights(cfg, 1)[3] == 6  # CD under EDT is on from the first epoch
    assert cfg.to_dict()["loss_list"][3]["loss_type"] == "fd_family"
    with pytest.raises(FastcdError) as info:
        config_from_dict({"loss_list": [{"loss_name": "CDLoss", "loss_type": "ce_family"}]})
    assert "loss_list[0]" in str(info.value) and "CDLoss is a fd_family loss" in str(info.value)


def test_lr_milestones_scale_with_epochs_like_the_loss_decay():
    """`--set train.epochs=16` on the 100-epoch recipe: lr x0.1 at 4.8/9.6/14.4 epochs, CE on from epoch 5."""
    import torch

    from fastcd.engine.trainer import loss_weights
    from fastcd.schedules import build_lr_scheduler

    path = Path(__file__).resolve().parents[1] / "configs/imagenet/s_resnet18.t_resnet34.cd.kdv2.lrdv2.yaml"
    cfg = load_config(path, ["train.epochs=16"])
    steps = 10
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    sched = build_lr_scheduler(opt, cfg, steps)
    lrs = []
    for _ in range(16 * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch_start = [lrs[e * steps] for e in range(16)]
    assert per_epoch_start[:5] == pytest.approx([0.1] * 5)
    assert lrs[48] == pytest.approx(0.01) and lrs[47] == pytest.approx(0.1)
    assert per_epoch_start[10] == pytest.approx(0.001) and per_epoch_start[15] == pytest.approx(1e-4)
    ce = [loss_weights(cfg, e)[0] for e in range(1, 17)]
    assert ce[:4] == [0] * 4 and ce[4] == 1
    with pytest.raises(FastcdError, match="optim.milestones: 150 is past the imagenet preset's 100 epochs"):
        load_config(path, ["optim.milestones=[30, 150]"])


@pytest.mark.parametrize("override,message", [
    ("data.mean=[0.5, 0.5]", "data.mean needs 3 values"),
    ("data.min_res=160", "data.min_res and data.max_res go together"),
])
def test_inconsistent_data_fields_are_errors(override, message):
    with pytest.raises(FastcdError, match=message):
        config_from_dict({}, [override])


def test_loss_families_match_the_config_types():
    import typing

    from fastcd.config import LossType
    from fastcd.losses.registry import FAMILIES

    assert set(typing.get_args(LossType)) == set(FAMILIES)
