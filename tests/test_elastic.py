"""Elastic training in one process: mid-epoch checkpoints that resume bit for bit (live teacher and teacher
cache, with a loss that draws random numbers), `train.resume: auto`, the global sample order across world
sizes, and the refusals. The torchrun cases (a killed worker restarted by torchrun, 2 -> 1 ranks) are in
tests/test_elastic_torchrun.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fastcd.cli import main
from fastcd.config import config_from_dict
from fastcd.data import build_loader
from fastcd.data.sharding import epoch_indices
from fastcd.engine.runtime import Runtime, loader_context
from fastcd.engine.step import DistillStep
from fastcd.engine.trainer import train
from fastcd.errors import FastcdError
from fastcd.losses.ce import CELoss
from fastcd.utils.checkpoint import load_checkpoint
from tests.conftest import tiny_dict

# CE counts from epoch 1 (lrdv1), so the random factor below reaches the weights
BASE = ("loss_list.0.loss_rate_decay=lrdv1", "train.checkpoint_every_steps=3", "train.log_every=1")


class Killed(Exception):
    """Stands for the process dying mid-epoch."""


def noisy_ce(monkeypatch: pytest.MonkeyPatch) -> None:
    """CE times a factor from the global torch RNG: a resume is exact only if the RNG continues exactly."""
    forward = CELoss.forward
    monkeypatch.setattr(CELoss, "forward", lambda self, s, y: forward(self, s, y) * (1 + 0.5 * torch.rand(())))


def kill_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The `step`-th optimizer step of the process raises `Killed` before it runs."""
    call, calls = DistillStep.__call__, [0]

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Killed
        return call(self, *args, **kwargs)

    monkeypatch.setattr(DistillStep, "__call__", counted)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and per-epoch losses, the same step records."""
    x, y = load_checkpoint(a / "latest.pt"), load_checkpoint(b / "latest.pt")
    for part in ("model", "connectors", "optimizer"):
        flat_x, flat_y = torch.utils._pytree.tree_flatten(x[part])[0], torch.utils._pytree.tree_flatten(y[part])[0]
        assert len(flat_x) == len(flat_y)
        for u, v in zip(flat_x, flat_y):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, part
    assert [r["loss"] for r in x["history"]] == [r["loss"] for r in y["history"]]
    assert [r["train_top1_err"] for r in x["history"]] == [r["train_top1_err"] for r in y["history"]]

    def steps(run: Path) -> list[tuple[int, list[float]]]:
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["losses"]) for r in records if r["kind"] == "step"]

    assert steps(a) == steps(b)


def test_a_mid_epoch_resume_equals_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    noisy_ce(monkeypatch)
    full = tiny_config(*BASE)
    train(full)
    cut = tiny_config(*BASE, f"train.out_dir={tmp_path / 'cut'}")
    with monkeypatch.context() as m:
        kill_at_step(m, 14)  # epoch 2 of 8-step epochs, 2 steps after the checkpoint of step 12
        with pytest.raises(Killed):
            train(cut)
    ckpt = load_checkpoint(cut.out_path / "latest.pt")
    assert (ckpt["epoch"], ckpt["position"]["epoch"], ckpt["position"]["step"]) == (1, 2, 4)
    train(cut, resume=True)
    assert_same_run(full.out_path, cut.out_path)
    sessions = json.loads((cut.out_path / "run.json").read_text())["sessions"]
    assert [(s["start_epoch"], s["start_step"]) for s in sessions] == [(0, 0), (1, 4)]


def test_a_mid_epoch_resume_in_the_first_epoch_with_a_teacher_cache(tmp_path, monkeypatch):
    """The cache's rows follow the resumed position (they are read by sample index)."""
    teacher = tmp_path / "teacher"
    raw = tiny_dict(str(teacher))
    raw.update(teacher=None, student={k: v for k, v in raw["teacher"].items() if k != "weights"},
               loss_list=[{"loss_name": "CELoss"}])
    raw["train"]["epochs"] = 1
    train(config_from_dict(raw))
    raw = tiny_dict(str(tmp_path / "src"))
    raw["teacher"]["weights"] = str(teacher / "latest.pt")
    raw["loss_list"] = [{"loss_name": "CELoss"}, {"loss_name": "CDLoss", "loss_rate": 6}]
    raw["train"].update(amp="fp32", epochs=2)
    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump(raw))
    assert main(["cache-teacher", str(src), "--dtype", "fp32", "--out", str(tmp_path / "cache")]) == 0
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    sets = ("train.checkpoint_every_steps=2", "train.log_every=1")
    full = config_from_dict({**raw, "train": {**raw["train"], "out_dir": str(tmp_path / "full")}}, list(sets))
    cut = config_from_dict({**raw, "train": {**raw["train"], "out_dir": str(tmp_path / "cut")}}, list(sets))
    train(full)
    with monkeypatch.context() as m:
        kill_at_step(m, 6)
        with pytest.raises(Killed):
            train(cut)
    assert load_checkpoint(cut.out_path / "latest.pt")["position"]["step"] == 4
    train(cut, resume=True)
    assert_same_run(full.out_path, cut.out_path)


def test_resume_auto_continues_the_same_run_and_refuses_another(tiny_config, monkeypatch):
    auto = ("train.resume=auto", "train.checkpoint_every_steps=5")
    cfg = tiny_config(*auto)
    with monkeypatch.context() as m:
        kill_at_step(m, 12)
        with pytest.raises(Killed):
            train(cfg)
    history = train(cfg)  # the same command again: continues after step 10
    assert [r["epoch"] for r in history] == [1, 2, 3]
    sessions = json.loads((cfg.out_path / "run.json").read_text())["sessions"]
    assert [(s["start_epoch"], s["start_step"]) for s in sessions] == [(0, 0), (1, 2)]
    with pytest.raises(FastcdError, match=r"train.resume=auto: run folder .* holds another run \(its config.yaml "
                                          r"differs: optim.lr: 0.05 -> 0.1\); continue it with --resume"):
        train(tiny_config(*auto, "optim.lr=0.1"))


def test_resume_auto_refuses_a_checkpoint_of_another_run(tiny_config, tmp_path):
    """A `latest.pt` copied in from another run (lr 0.1, 3 epochs) is refused, though its fields are ones
    --resume may change and the folder's config.yaml is this run's."""
    cfg = tiny_config("train.resume=auto", "train.epochs=5")
    train(cfg, stop_after_epoch=1)
    other = tiny_config("optim.lr=0.1", f"train.out_dir={tmp_path / 'other'}")
    train(other)
    shutil.copyfile(other.out_path / "latest.pt", cfg.out_path / "latest.pt")
    with pytest.raises(FastcdError, match=r"train.resume=auto: checkpoint .*latest.pt' was written by another run "
                                          r"\(its config differs: .*optim.lr: 0.1 -> 0.05.*train.epochs: 3 -> 5"):
        train(cfg, stop_after_epoch=4)


def test_resume_auto_starts_afresh_where_the_run_wrote_no_checkpoint(tiny_config):
    cfg = tiny_config("train.resume=auto", "train.epochs=1")
    train(cfg)
    for name in ("latest.pt", "best.pt"):  # as if it had died before its first checkpoint
        (cfg.out_path / name).unlink()
    assert len(train(cfg)) == 1
    sessions = json.loads((cfg.out_path / "run.json").read_text())["sessions"]
    assert len(sessions) == 1 and load_checkpoint(cfg.out_path / "latest.pt")["epoch"] == 1


@pytest.mark.parametrize("n,batch,world", [(256, 32, 2), (250, 16, 4), (100, 8, 3)])
def test_the_global_order_of_an_epoch_does_not_depend_on_the_world_size(n, batch, world):
    """Global step s reads the same samples whether `world` ranks of `batch` or one rank of `world * batch`."""
    one = epoch_indices(n, epoch=2, seed=5, rank=0, world_size=1, train=True, batch_size=world * batch)
    ranks = [epoch_indices(n, epoch=2, seed=5, rank=r, world_size=world, train=True, batch_size=batch)
             for r in range(world)]
    steps = n // (world * batch)
    for s in range(steps):
        together = torch.cat([r[s * batch:(s + 1) * batch] for r in ranks])
        assert torch.equal(together, one[s * world * batch:(s + 1) * world * batch])
    flat = torch.cat(ranks).tolist()
    assert len(set(flat)) == len(flat) == n // world * world


def test_a_loader_starts_an_epoch_at_a_batch(tiny_config):
    cfg = tiny_config()
    ctx = loader_context(cfg, Runtime(torch.device("cpu")))
    loader = build_loader(cfg.data, "train", ctx)
    loader.set_epoch(1)
    whole = [(x.clone(), y.clone()) for x, y in loader]
    loader.set_epoch(1, start_batch=3)
    rest = list(loader)
    assert len(loader) == len(whole) - 3 == len(rest)
    for (x, y), (u, v) in zip(whole[3:], rest, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_another_world_size_needs_the_same_global_batch(tiny_config):
    from fastcd.engine.elastic import check_world_size

    ckpt = {"world_size": 2, "config": {"data": {"batch_size": 32}}}
    check_world_size(ckpt, tiny_config("data.batch_size=64"), Path("latest.pt"), 1)
    with pytest.raises(FastcdError, match=r"cannot resume from 'latest.pt' on 1 rank: it ran on 2 with "
                                          r"data.batch_size=32 \(a global batch of 64\), now 32; .*run on 2 ranks, "
                                          r"or keep the global batch with --set data.batch_size=64"):
        check_world_size(ckpt, tiny_config(), Path("latest.pt"), 1)


def test_mid_epoch_checkpoints_need_a_loader_that_replays_its_crops(tiny_config):
    from fastcd.engine.elastic import check_mid_epoch

    class Opaque:
        replays_crops = False

    cfg = tiny_config("train.checkpoint_every_steps=10")
    with pytest.raises(FastcdError, match="cannot use train.checkpoint_every_steps=10: data.backend 'synthetic'"):
        check_mid_epoch(cfg, Opaque(), None, Path("latest.pt"))
    with pytest.raises(FastcdError, match="cannot resume 'latest.pt', written mid-epoch"):
        check_mid_epoch(tiny_config(), Opaque(), {"epoch": 1, "step": 2}, Path("latest.pt"))
