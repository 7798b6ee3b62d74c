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
