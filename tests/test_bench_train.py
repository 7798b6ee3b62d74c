"""`fastcd bench train`: the ablation table on a tiny CPU config, the phase split, BatchNorm folding."""
import json

import pytest
import torch
import yaml
from torch import nn

from fastcd.cli import main
from fastcd.engine.trainer import train
from fastcd.errors import FastcdError
from fastcd.knobs import PHASES, measure
from fastcd.models import build_resnet
from fastcd.models.fold import fold_batchnorm
from tests.conftest import tiny_dict

TINY = ["student.width=0.0625", "teacher.width=0.0625", "data.res=16", "data.val_res=16", "data.batch_size=32"]


KNOBS = ["original", "channels_last", "autocast bf16", "fused losses", "fused optimizer", "teacher BN folded",
         "teacher cache", "torch.compile", "loader torch", "loader ffcv", "loader dali", "CUDA graphs"]


def test_ablation_gives_one_row_per_knob_and_names_the_skipped(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    args = ["bench", "train", str(cfg_path), "--ablation", "--steps", "3", "--warmup", "1", "--skip", "torch.compile",
            "--out", str(tmp_path / "results")]
    assert main(args + [a for o in TINY for a in ("--set", o)]) == 0
    (json_path,) = (tmp_path / "results").glob("*-train.json")
    rows = json.loads(json_path.read_text())[-1]["rows"]
    assert [r["knob"] for r in rows] == KNOBS
    status = {r["knob"]: r["status"] for r in rows}
    ran = ["original", "channels_last", "autocast bf16", "fused optimizer", "teacher BN folded", "teacher cache"]
    assert all(status[k] == "ok" for k in ran), rows
    reasons = {r["knob"]: r.get("reason", "") for r in rows}
    assert "--skip" in reasons["torch.compile"] and "CUDA" in reasons["fused losses"]
    assert "synthetic" in reasons["loader ffcv"] and "GPU" in reasons["CUDA graphs"]
    for r in rows:
        if r["status"] == "ok":
            assert r["images_per_s"] > 0 and set(r["phases_ms"]) == set(PHASES) and r["host_peak_mib"] > 0
    assert rows[0]["vs_previous"] == 1.0
    by = {r["knob"]: r for r in rows}
    assert by["teacher cache"]["phases_ms"]["teacher"] < 0.2 * by["teacher BN folded"]["phases_ms"]["teacher"]
    table = json_path.with_suffix(".md").read_text()
    assert all(f"| {k} |" in table for k in KNOBS)
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "knob that bought the most" in capsys.readouterr().out


def test_phase_times_add_up_to_the_step_time(tiny_config):
    cfg = tiny_config("train.device=cpu", "train.amp=fp32", "teacher.fold_bn=true")
    result = measure(cfg, warmup=1, steps=6)
    assert all(v > 0 for v in result["phases_ms"].values())
    # Marks cover the whole loop, so the mean step equals the wall-clock per step up to loop overhead.
    assert result["step_ms_mean"] == pytest.approx(result["wall_ms_per_step"], rel=0.1)
    assert result["images_per_s_median_step"] == pytest.approx(32 / (result["step_ms"] / 1e3), rel=0.01)
    assert result["images_per_s"] == pytest.approx(32 / (result["wall_ms_per_step"] / 1e3), rel=0.01)


@pytest.mark.parametrize("arch,stem", [("resnet34", "imagenet"), ("resnet50", "cifar")])
def test_folded_batchnorm_gives_the_same_outputs(arch, stem):
    net = build_resnet(arch, num_classes=7, stem=stem, width=0.125)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    net.eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        want = net(x)
        got = fold_batchnorm(net)(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    for a, b in zip([got.logits, *got.feats], [want.logits, *want.feats]):  # fp32 rounding, relative to the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * b.abs().max().item())


def test_fold_bn_needs_eval_mode(tiny_config):
    with pytest.raises(FastcdError, match="fold_bn=true needs teacher.bn_mode=eval"):
        tiny_config("teacher.fold_bn=true", "teacher.bn_mode=train")
    with pytest.raises(FastcdError, match="eval mode"):
        fold_batchnorm(build_resnet("resnet18", 4, "cifar", 0.0625).train())
    history = train(tiny_config("teacher.fold_bn=true", "train.epochs=1", "train.max_steps_per_epoch=2"))
    assert len(history) == 1


def test_loader_rows_are_compared_with_the_row_before_them(tmp_path, monkeypatch, capsys):
    """Loader rows replace one another: each is compared with the last row before the loaders."""
    import fastcd.bench.train as bench
    import fastcd.knobs

    speeds = iter([100.0, 150.0, 150.0, 150.0, 150.0, 225.0, 112.5, 450.0, 225.0])
    seen = []

    def fake_measure(cfg, warmup, steps, cuda_graphs=False):
        seen.append(cfg.data.backend)
        speed = next(speeds)
        return {"images_per_s": speed, "images_per_s_median_step": speed, "step_ms": 1.0, "step_ms_mean": 1.0,
                "phases_ms": dict.fromkeys(PHASES, 0.1), "data_share": 0.1, "host_peak_mib": 1.0}

    monkeypatch.setattr(fastcd.knobs, "measure", fake_measure)
    data = bench.PreparedData(tmp_path / "out", tmp_path / "src", 4, ("ffcv", "dali"))
    monkeypatch.setattr(bench, "prepared_data", lambda path, images: data)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    assert main(["bench", "train", str(cfg_path), "--ablation", "--data", "loader", "--out", str(tmp_path)]) == 0
    assert seen == ["imagefolder"] * 6 + ["torch", "ffcv", "dali"]
    rows = {r["knob"]: r for r in json.loads(next(tmp_path.glob("*-train.json")).read_text())[-1]["rows"]}
    assert [rows[k]["vs_previous"] for k in ("torch.compile", "loader torch", "loader ffcv", "loader dali")] == \
        [1.5, 0.5, 2.0, 1.0]
    assert "knob that bought the most: loader ffcv (2.00x" in capsys.readouterr().out
    assert main(["bench", "train", str(cfg_path), "--ablation", "--skip", "compile"]) == 2
    assert "unknown knob 'compile'" in capsys.readouterr().err


def test_an_interrupt_keeps_the_rows_done(tmp_path, monkeypatch):
    import fastcd.knobs

    calls = []

    def fake_measure(cfg, warmup, steps, cuda_graphs=False):
        calls.append(cfg.train.amp)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"images_per_s": 10.0 * len(calls), "images_per_s_median_step": 10.0 * len(calls), "step_ms": 1.0,
                "step_ms_mean": 1.0,
                "phases_ms": dict.fromkeys(PHASES, 0.1), "data_share": 0.1, "host_peak_mib": 1.0}

    monkeypatch.setattr(fastcd.knobs, "measure", fake_measure)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    assert main(["bench", "train", str(cfg_path), "--ablation", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*-train.json")).read_text())[-1]["rows"]
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"] and rows[1]["vs_previous"] == 2.0
    assert len(rows) == len(KNOBS) and {r["status"] for r in rows[2:]} == {"interrupted"}
    assert calls == ["fp32", "fp32", "bf16"]


@pytest.mark.parametrize("name", ["fast_16ep", "fast_32ep", "fast_40ep"])
def test_fast_recipes_load_and_run_a_benchmark_step(name):
    from pathlib import Path

    from fastcd.config import load_config
    from fastcd.data.resolution import train_res

    path = Path(__file__).resolve().parents[1] / "configs" / "imagenet" / f"{name}.yaml"
    cfg = load_config(path)
    res = [train_res(cfg.data, e) for e in range(cfg.train.epochs)]
    assert res[0] == 160 and res[-1] == 192 and res == sorted(res) and cfg.data.val_res == 224
    assert cfg.data.flip_tta and cfg.teacher.fold_bn and cfg.data.batch_size == 1024
    assert [s.params.get("label_smoothing", 0) for s in cfg.loss_list] == [0.1, 0, 0]
    tiny = load_config(path, ["teacher.weights=none", "train.device=cpu", "student.width=0.0625",
                              "teacher.width=0.0625", "student.num_classes=4", "teacher.num_classes=4",
                              "data.backend=synthetic", "data.batch_size=8", "data.min_res=0", "data.max_res=0",
                              "data.res=32", "data.val_res=32", "data.train_subset=16"])
    assert measure(tiny, warmup=0, steps=1)["images_per_s"] > 0
