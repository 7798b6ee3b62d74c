"""What a run reports while it trains: per-step and per-epoch records in metrics.jsonl, and TensorBoard."""
from __future__ import annotations

import json
import os
import sys

import pytest

from fastcd.engine.trainer import train
from fastcd.errors import FastcdError

STEP_KEYS = {"kind", "epoch", "step", "loss", "losses", "weights", "lr", "images_per_s", "data_wait_s"}


def records(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.out_path / "metrics.jsonl").read_text().splitlines()]


def test_per_step_scalars_and_per_epoch_records_in_metrics_jsonl(tiny_config):
    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=4", "train.log_every=2")
    history = train(cfg)
    lines = records(cfg)
    assert [(r["kind"], r.get("step", r["epoch"])) for r in lines] == [
        ("step", 2), ("step", 4), ("epoch", 1), ("step", 6), ("step", 8), ("epoch", 2)]
    steps = [r for r in lines if r["kind"] == "step"]
    assert all(set(r) == STEP_KEYS for r in steps)
    assert all(len(r["losses"]) == len(r["weights"]) == 3 and r["images_per_s"] > 0 and r["data_wait_s"] >= 0
               for r in steps)
    assert [r["epoch"] for r in steps] == [1, 1, 2, 2] and steps[0]["weights"] == history[0]["weights"]
    assert [r for r in lines if r["kind"] == "epoch"] == history
    assert all(r["val_top1_err"] is not None for r in history)


def test_a_resume_drops_the_records_after_its_checkpoint(tiny_config):
    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=4", "train.log_every=2")
    train(cfg, stop_after_epoch=1)
    with open(cfg.out_path / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then a torn line
        f.write(json.dumps({"kind": "step", "epoch": 2, "step": 6}) + "\n" + '{"kind": "st')
    train(cfg, resume=True)
    assert [(r["kind"], r.get("step", r["epoch"])) for r in records(cfg)] == [
        ("step", 2), ("step", 4), ("epoch", 1), ("step", 6), ("step", 8), ("epoch", 2)]


def test_eval_every_skips_the_evaluations_between_and_a_resume_keeps_the_skipped_epochs(tiny_config, monkeypatch):
    """train.eval_every=2 of 3 epochs: epochs 2 and 3 are evaluated, epoch 1 is logged without one; a resume
    after epoch 1 does not evaluate it (it was never due) and keeps its record."""
    import fastcd.engine.trainer as trainer

    evaluated = []
    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda model, *a, **k: evaluated.append(1) or real(model, *a, **k))
    cfg = tiny_config("train.epochs=3", "train.max_steps_per_epoch=2", "train.log_every=2", "train.eval_every=2")
    train(cfg, stop_after_epoch=1)
    history = train(cfg, resume=True)
    assert len(evaluated) == 2
    assert [r["val_top1_err"] is not None for r in history] == [False, True, True]
    assert [r for r in records(cfg) if r["kind"] == "epoch"] == history
    assert (cfg.out_path / "best.pt").is_file()
    only_last = tiny_config("train.epochs=2", "train.max_steps_per_epoch=2", "train.eval_every=0",
                            f"train.out_dir={cfg.out_path}-last")
    assert [r["val_top1_err"] is not None for r in train(only_last)] == [False, True]


def test_tensorboard_gets_the_same_scalars_and_the_validation_error(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=4", "train.log_every=2", "train.tensorboard=true")
    history = train(cfg)
    events = EventAccumulator(str(cfg.out_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait_s", "loss/0_CELoss",
            "weight/2_CDLoss", "val/top1_err", "val/top5_err"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.value for e in events.Scalars("val/top1_err")] == pytest.approx([r["val_top1_err"] for r in history])


def test_tensorboard_asked_for_but_not_installed_is_a_one_line_error(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = tiny_config("train.tensorboard=true")
    with pytest.raises(FastcdError, match=r"train.tensorboard=true needs the tensorboard package \(pip install"):
        train(cfg)
    assert not (cfg.out_path / "latest.pt").exists()


def test_metrics_agree_with_the_checkpoint_after_a_crash_between_them(tiny_config, monkeypatch):
    """The epoch's record is appended after its evaluated checkpoint: a crash between the two used to lose
    the record for good, as a resume kept the log as it was up to the checkpoint's epoch."""
    from fastcd.engine.sinks import MetricsLog

    cfg = tiny_config("train.epochs=3", "train.max_steps_per_epoch=2", "train.log_every=1")
    real = MetricsLog.epoch

    def crash_at_epoch_2(self, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # after latest.pt holds the evaluated epoch 2
        real(self, record)

    monkeypatch.setattr(MetricsLog, "epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(MetricsLog, "epoch", real)
    history = train(cfg, resume=True)
    lines = records(cfg)
    assert [(r["kind"], r.get("step", r["epoch"])) for r in lines] == [
        ("step", 1), ("step", 2), ("epoch", 1), ("step", 3), ("step", 4), ("epoch", 2), ("step", 5), ("step", 6),
        ("epoch", 3)]
    assert [r for r in lines if r["kind"] == "epoch"] == history


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_while_logging_is_a_one_line_error(tiny_config, monkeypatch):
    """Appending to metrics.jsonl on a full disk used to end in an OSError traceback."""
    import builtins

    import fastcd.engine.sinks as sinks

    monkeypatch.setattr(sinks, "open", lambda path, *args, **kw: builtins.open("/dev/full", *args, **kw), raising=False)
    with pytest.raises(FastcdError, match=r"no space left writing '.*metrics.jsonl' \(No space left on device\)"):
        train(tiny_config("train.epochs=1", "train.max_steps_per_epoch=2"))
