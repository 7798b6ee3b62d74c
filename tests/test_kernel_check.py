"""The CPU kernel check (`fastcd.engine.kernel_check`): a wrong, crashing or hanging kernel in the run's memory
format or autocast dtype makes the run fall back to a checked one, says so once, and records it in run.json."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from fastcd.config import Config, load_config
from fastcd.engine import kernel_check
from fastcd.engine.kernel_check import check_kernels, conv_specs, known_bad
from fastcd.engine.trainer import train
from fastcd.paths import configs_dir
from tests.conftest import tiny_dict

FAKE_PROBE = """
import os, signal, time
from fastcd.engine import kernel_probe
real = kernel_probe.conv_outputs
def fake(conv, inputs, channels_last, amp):
    out = real(conv, inputs, channels_last, amp)
    {fault}
    return out
kernel_probe.conv_outputs = fake
kernel_probe.main()
"""
FAULTS = {  # what the fake kernel of each test does wrong
    "wrong_grad": "if channels_last and conv['backward']: out['grad_weight'] = out['grad_weight'] * 615",
    "segfault": "if channels_last: os.kill(os.getpid(), signal.SIGSEGV)",
    "hang": "if channels_last: time.sleep(60)",
    "bf16": "if amp == 'bf16': out['out'] = out['out'] * 2",
    "folded": "if channels_last and conv['bias']: out['out'] = out['out'] + 1",
}
WIDE = ("student.width=0.25", "teacher.width=0.25")  # 16 channels in the first stage: no known-bad shape


@pytest.fixture
def fake_probe(tmp_path, monkeypatch):
    """Factory: the kernel check's child becomes a probe with the kernel fault `name` (of FAULTS)."""

    def make(name: str) -> None:
        script = tmp_path / f"probe_{name}.py"
        script.write_text(FAKE_PROBE.format(fault=FAULTS[name]))
        monkeypatch.setattr(kernel_check, "PROBE", [sys.executable, str(script)])

    return make


def kernel_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("CPU kernels:")]


def session_kernels(cfg: Config) -> dict:
    return json.loads((cfg.out_path / "run.json").read_text())["sessions"][-1]["kernels"]


def test_the_real_check_passes_channels_last_here_and_is_cached(tiny_config, monkeypatch):
    cfg = tiny_config(*WIDE)
    assert not any(map(known_bad, conv_specs(cfg)))
    first = check_kernels(cfg, "fp32")
    assert (first.channels_last, first.amp, first.cached) == (True, "fp32", False)
    assert first.candidates[0].result == "passed" and "as configured" in first.reason
    monkeypatch.setattr(kernel_check, "_probe", lambda *args: pytest.fail("the cached verdict was not used"))
    again = check_kernels(cfg, "fp32")
    assert again.cached and again.channels_last and again.candidates == first.candidates
    assert len(list(kernel_check.cache_dir().glob("*.json"))) >= 1
    assert kernel_check.cache_dir().is_relative_to(os.environ["XDG_CACHE_HOME"])  # the session's, not ~/.cache


def test_a_kernel_with_a_wrong_weight_gradient_falls_back_to_contiguous(tiny_config, fake_probe):
    fake_probe("wrong_grad")
    check = check_kernels(tiny_config(*WIDE), "fp32")
    assert (check.channels_last, check.amp) == (False, "fp32")
    assert check.candidates[0].result == "mismatch" and "off by 614" in check.candidates[0].detail
    assert check.reason.startswith("contiguous fp32, not channels_last fp32: mismatch, trained")


def test_a_wrong_bf16_kernel_falls_back_to_fp32(tiny_config, fake_probe):
    fake_probe("bf16")
    check = check_kernels(tiny_config(*WIDE), "bf16")
    assert (check.channels_last, check.amp) == (False, "fp32")
    assert [c.result for c in check.candidates] == ["mismatch", "mismatch", "reference"]


def test_the_folded_teachers_convolutions_are_checked_with_their_bias(tiny_config, fake_probe):
    cfg = tiny_config(*WIDE, "teacher.bn_mode=eval", "teacher.fold_bn=true")
    assert any(s.bias and not s.backward for s in conv_specs(cfg))
    assert not any(s.bias for s in conv_specs(tiny_config(*WIDE)))
    fake_probe("folded")
    check = check_kernels(cfg, "fp32")
    assert not check.channels_last and "forward-only" in check.candidates[0].detail


def test_a_hanging_check_falls_back(tiny_config, fake_probe, monkeypatch):
    fake_probe("hang")
    monkeypatch.setattr(kernel_check, "PROBE_TIMEOUT_S", 5.0)
    check = check_kernels(tiny_config(*WIDE), "fp32")
    assert not check.channels_last and check.candidates[0].result == "hung"


def test_a_crashing_check_falls_back_and_the_run_trains(tiny_config, fake_probe, capsys):
    fake_probe("segfault")
    cfg = tiny_config(*WIDE, "train.epochs=1", "train.max_steps_per_epoch=2")
    history = train(cfg)
    assert len(history) == 1 and history[0]["val_top1_err"] is not None
    lines = kernel_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "contiguous fp32, not channels_last fp32: crashed" in lines[0]
    assert "SIGSEGV" in lines[0]
    kernels = session_kernels(cfg)
    assert kernels["channels_last"] is False and kernels["candidates"][0]["result"] == "crashed"


def baseline_48px(out: Path, *overrides: str) -> Config:
    """The shipped width-1/8 baseline at 48 px on synthetic data (issue 28's segfault), two steps."""
    return load_config(configs_dir() / "fashion-mnist" / "s_resnet18.baseline.yaml", [
        "data.backend=synthetic", "data.res=48", "data.val_res=48", "data.train_subset=64", "data.val_subset=32",
        "data.batch_size=32", "train.epochs=1", "train.log_every=1", "train.progress=false", "train.device=cpu",
        f"train.out_dir={out}", *overrides])


def first_step_loss(cfg: Config) -> float:
    records = [json.loads(line) for line in (cfg.out_path / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["kind"] == "step")


def test_the_48px_width_eighth_baseline_falls_back_trains_and_matches_contiguous(tmp_path, capsys):
    cfg = baseline_48px(tmp_path / "default")
    assert cfg.train.channels_last and cfg.student.width == 0.125
    history = train(cfg)
    assert history[-1]["val_top1_err"] is not None
    lines = kernel_lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].startswith("CPU kernels: contiguous fp32, not channels_last fp32: known "
                                                   "bad, trained 1x1 conv 8->16 stride 2 at 48x48")
    assert "oneDNN issue 6035" in lines[0]
    kernels = session_kernels(cfg)
    assert kernels["channels_last"] is False and kernels["candidates"][0]["result"] == "known bad"
    contiguous = baseline_48px(tmp_path / "contiguous", "train.channels_last=false")
    train(contiguous)
    assert session_kernels(contiguous)["candidates"][0]["result"] == "reference"
    assert first_step_loss(cfg) == first_step_loss(contiguous)


def test_without_the_known_bad_list_the_real_probe_decides_and_the_run_trains(tmp_path, monkeypatch, capsys):
    """The real probe on the real kernels: on the 2-core AVX-512 machine it segfaults on oneDNN 6035's shape
    and the run falls back; on a CPU whose kernel is right it passes. Either way the run trains."""
    monkeypatch.setattr(kernel_check, "known_bad", lambda spec: "")
    cfg = baseline_48px(tmp_path / "probed")
    assert train(cfg)[-1]["val_top1_err"] is not None
    first = session_kernels(cfg)["candidates"][0]
    assert first["result"] in ("passed", "crashed", "hung", "mismatch")
    assert session_kernels(cfg)["channels_last"] is (first["result"] == "passed")
    assert len(kernel_lines(capsys.readouterr().out)) == 1


def test_the_cpu_layouts_benchmark_times_both_layouts(tmp_path):
    from fastcd.bench.cpu_layouts import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    main([str(config), "--pairs", "1", "--out", str(tmp_path / "results"), "--set", *WIDE])
    (result,) = json.loads(next((tmp_path / "results").glob("*-cpu-layouts.json")).read_text())
    assert result["channels_last_ms"] > 0 and result["contiguous_ms"] > 0 and result["pairs"] == 1
    assert "commit" in result and result["images"] == [32, 3, 16, 16]
