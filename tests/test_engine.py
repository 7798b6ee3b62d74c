"""The training engine end to end on tiny synthetic runs: learning, exact resume, failures, every flag, DDP."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastcd.cli import main
from fastcd.config import config_from_dict
from fastcd.data_prep.sample_table import OFFSET, SHARD, read_table
from fastcd.engine.trainer import train
from fastcd.errors import FastcdError
from fastcd.losses.ce import CELoss
from fastcd.utils.checkpoint import load_checkpoint
from tests.conftest import prepared_dict, tiny_dict


def test_tiny_distillation_lowers_its_loss_and_writes_its_outputs(tiny_config):
    cfg = tiny_config("train.epochs=3", "loss_list.0.loss_rate_decay=lrdv1", "loss_list.1.loss_rate_decay=lrdv1")
    history = train(cfg)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["losses"][2] < history[0]["losses"][2]
    lines = [json.loads(line) for line in (cfg.out_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [1, 2, 3]
    ckpt = load_checkpoint(cfg.out_path / "latest.pt")
    assert ckpt["epoch"] == 3 and ckpt["config"]["name"] == "tiny" and (cfg.out_path / "best.pt").is_file()
    assert len(ckpt["connectors"]) > 0


def test_student_alone_learns_the_synthetic_classes(tiny_config):
    history = train(tiny_config("teacher=null", "loss_list=[{loss_name: CELoss}]", "optim.lr=0.1"))
    assert history[-1]["val_top1_err"] < 50  # 4 classes: chance is 75% error


def test_edt_weights_are_logged_per_epoch(tiny_config):
    history = train(tiny_config("train.epochs=10", "train.max_steps_per_epoch=1"))
    ce = [r["weights"][0] for r in history]
    cd = [r["weights"][2] for r in history]
    assert ce[:3] == [0, 0, 0] and ce[3:] == [1] * 7
    assert cd[:2] == [6, 6] and cd[2] == pytest.approx(5.4) and cd[-1] == pytest.approx(6 * 0.9**3)


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_config):
    full = tiny_config()
    train(full)
    reference = load_checkpoint(full.out_path / "latest.pt")
    split = tiny_config(f"train.out_dir={tmp_path / 'split'}")
    train(split, stop_after_epoch=1)
    assert load_checkpoint(split.out_path / "latest.pt")["epoch"] == 1
    train(split, resume=True)
    resumed = load_checkpoint(split.out_path / "latest.pt")
    for part in ("model", "connectors"):
        for key, value in reference[part].items():
            assert torch.equal(value, resumed[part][key]), key
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in reference["history"]]


def test_impossible_resume_is_an_error(tiny_config):
    cfg = tiny_config("train.epochs=2")
    train(cfg, stop_after_epoch=1)
    with pytest.raises(FastcdError, match="cannot resume.*student.arch 'resnet18' -> 'resnet34'; this cannot change"):
        train(tiny_config("train.epochs=2", "student.arch=resnet34"), resume=True)
    with pytest.raises(FastcdError, match="checkpoint .*latest.pt' does not exist .no run was started"):
        train(tiny_config(f"train.out_dir={cfg.out_path}-other"), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config()
    train(cfg, stop_after_epoch=1)
    good = (cfg.out_path / "latest.pt").read_bytes()
    monkeypatch.setattr(CELoss, "forward", lambda self, s, y: s.float().sum() * float("nan"))
    with pytest.raises(FastcdError, match=r"non-finite loss at epoch 2, step 9: CELoss=nan, KDLossv2=[\d.]+, CDLoss"):
        train(cfg, resume=True)
    assert (cfg.out_path / "latest.pt").read_bytes() == good


FLAGS = [
    ["train.amp=bf16"],
    ["train.amp=fp16"],
    ["optim.fused=true", "optim.nesterov=true"],
    ["train.channels_last=false"],
    ["teacher.bn_mode=train"],
    ["data.flip_tta=true", "data.val_batch_size=7"],
    ["optim.schedule=linear", "optim.peak_epoch=1"],
    ["optim.schedule=multistep", "optim.milestones=[50]", "optim.warmup_epochs=0.5"],
    ["optim.schedule=step", "optim.step_size=1"],
    ["data.min_res=16", "data.max_res=32", "data.start_ramp=0", "data.end_ramp=1", "data.res=32"],
    ["teacher=null", "loss_list=[{loss_name: CELoss, label_smoothing: 0.1}]"],
    ["loss_list=[{loss_name: CELoss}, {loss_name: KDLoss, T: 4, loss_type: kd_family}]"],
    ["train.dataset_type=cifar"],
]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f))
def test_every_flag_runs_a_step(tiny_config, flags):
    history = train(tiny_config("train.epochs=2", "train.max_steps_per_epoch=2", *flags))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


@pytest.mark.slow
def test_compile_runs_a_step(tiny_config):
    history = train(tiny_config("train.epochs=1", "train.max_steps_per_epoch=2", "train.compile=true"))
    assert len(history) == 1


def test_cli_train_and_eval(tiny_config, tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "cli"))))
    assert main(["train", str(cfg_path), "--set", "train.epochs=1"]) == 0
    assert main(["eval", str(cfg_path), "--checkpoint", str(tmp_path / "cli" / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "best val top-1/top-5 error" in out and "top-1 error" in out
    assert main(["eval", str(cfg_path), "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with 2 gloo ranks trains and rank 0 alone writes the checkpoint."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "ddp"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastcd.cli", "train",
                           str(cfg_path), "--set", "train.epochs=2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "config.yaml", "latest.pt",
                                                                   "metrics.jsonl", "run.json"]
    history = load_checkpoint(tmp_path / "ddp" / "latest.pt")["history"]
    assert len(history) == 2 and proc.stdout.count("epoch 2/2") == 1  # only rank 0 logs
    assert proc.stdout.count("best val top-1/top-5 error") == 1  # the summary, once


def test_a_new_run_refuses_a_folder_that_holds_another(tiny_config, tmp_path, capsys):
    cfg = tiny_config("train.epochs=1", "train.max_steps_per_epoch=1")
    train(cfg)
    first = (cfg.out_path / "latest.pt").read_bytes()
    with pytest.raises(FastcdError, match=r"run folder '.*run' already holds a run \(latest.pt, best.pt, "
                                          r"metrics.jsonl.*--resume.*--force"):
        train(cfg)
    assert (cfg.out_path / "latest.pt").read_bytes() == first
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(cfg_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(cfg_path), "--force"]) == 0


def test_the_run_folder_records_the_resolved_config_and_the_environment(tiny_config):
    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=1", "optim.lr=0.02")
    train(cfg, stop_after_epoch=1)
    saved = yaml.safe_load((cfg.out_path / "config.yaml").read_text())
    assert config_from_dict(saved).to_dict() == cfg.to_dict() and saved["optim"]["lr"] == 0.02
    train(cfg, resume=True)
    run = json.loads((cfg.out_path / "run.json").read_text())
    first, resumed = run["sessions"]
    assert first["libraries"]["torch"] == torch.__version__ and first["libraries"]["numpy"]
    assert first["commit"] and first["machine"] and first["cpu_count"]
    assert (first["start_epoch"], resumed["start_epoch"]) == (0, 1)


def test_checkpoints_are_loaded_weights_only(tmp_path):
    """A checkpoint that would run code when unpickled is refused, and the code does not run."""
    import pathlib

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    torch.save({"format": "fastcd-checkpoint-v1", "model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(FastcdError, match="evil.pt' is not a fastcd checkpoint: the weights-only unpickler refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_resume_applies_optimizer_overrides(tiny_config):
    """`--resume --set optim.lr=0.01` used to keep the checkpoint's lr while recording 0.01 in the config."""
    base = ("train.epochs=3", "train.max_steps_per_epoch=2", "optim.schedule=step", "optim.step_size=100")
    cfg = tiny_config(*base, "optim.lr=0.05", "optim.momentum=0.9")
    train(cfg, stop_after_epoch=1)
    history = train(tiny_config(*base, "optim.lr=0.01", "optim.momentum=0.5", "optim.weight_decay=0.001"),
                    resume=True, stop_after_epoch=2)
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.01])
    ckpt = load_checkpoint(cfg.out_path / "latest.pt")
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == pytest.approx((0.01, 0.5, 0.001))
    assert ckpt["config"]["optim"]["lr"] == 0.01


@pytest.mark.parametrize("override,names", [
    ("train.seed=9", "train.seed"),
    ("data.batch_size=128", "steps per epoch .*data.batch_size 32 -> 128"),
    ("train.max_steps_per_epoch=1", "steps per epoch .*train.max_steps_per_epoch"),
    ("data.val_subset=32", "data.val_subset 64 -> 32; this cannot change"),  # best.pt would compare other sets
    ("data.flip_tta=true", "data.flip_tta False -> True"),
    ("data.train_subset=260", "data.train_subset 256 -> 260"),  # the same steps per epoch, another training set
    ("loss_list.1={loss_name: KDLoss, T: 2}",
     r"loss_list.loss_name \['CELoss', 'KDLossv2', 'CDLoss'\] -> \['CELoss', 'KDLoss'"),
])
def test_resume_refuses_overrides_it_cannot_apply_by_name(tiny_config, override, names):
    base = ("train.epochs=2", "train.max_steps_per_epoch=3")
    train(tiny_config(*base), stop_after_epoch=1)
    with pytest.raises(FastcdError, match=f"cannot resume .*{names}"):
        train(tiny_config(*base, override), resume=True)


def test_resume_may_change_the_precision(tiny_config):
    base = ("train.epochs=2", "train.max_steps_per_epoch=1")
    train(tiny_config(*base, "train.amp=bf16"), stop_after_epoch=1)
    assert len(train(tiny_config(*base, "train.amp=fp16"), resume=True)) == 2


def test_metrics_accept_a_zero_dimensional_label():
    """A one-sample batch whose labels were squeezed to 0-d used to raise IndexError in the meter."""
    from fastcd.engine.metrics import Meter

    meter = Meter(0, torch.device("cpu"))
    logits = torch.tensor([[0.1, 2.0, 0.3]])
    meter.update(torch.zeros(0), torch.zeros(()), logits, torch.tensor(1), 0)
    meter.update(torch.zeros(0), torch.zeros(()), logits, torch.tensor([0]), 1)
    stats = meter.read()
    assert stats["samples"] == 2 and stats["top1_err"] == 50.0


def test_a_failing_evaluation_keeps_the_epochs_training(tiny_config, monkeypatch):
    """The epoch's checkpoint is written before evaluating; a resume evaluates the pending epoch first."""
    import fastcd.engine.trainer as trainer

    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=2")
    real = trainer.evaluate

    def failing(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg)
    ckpt = load_checkpoint(cfg.out_path / "latest.pt")
    assert ckpt["epoch"] == 1 and ckpt["history"][0]["val_top1_err"] is None
    monkeypatch.setattr(trainer, "evaluate", real)
    history = train(cfg, resume=True)
    assert [r["epoch"] for r in history] == [1, 2] and all(r["val_top1_err"] is not None for r in history)
    epochs = [json.loads(x) for x in (cfg.out_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_top1_err"] is not None for r in epochs if r.get("kind", "epoch") == "epoch"] == [True, True]


def test_a_step_keeps_no_stage_map_alive(tiny_config):
    """The step's outputs (every stage map of student, teacher and connectors) used to stay alive through
    the next step; only the logits the meter reads may survive it."""
    import gc
    import weakref

    from fastcd.engine.runtime import setup_runtime
    from fastcd.engine.trainer import build_step, loss_weights

    cfg = tiny_config()
    model, step = build_step(cfg, setup_runtime(cfg), steps_per_epoch=4)
    step.set_weights(loss_weights(cfg, cfg.train.epochs))
    refs = []
    for module in (model.student.layer1, model.student.layer4, step.teacher.layer2, model.connectors["0"]):
        module.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    images = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    logits, terms, total = step(images, torch.randint(0, 4, (8,)))
    gc.collect()
    assert len(refs) == 4 and [r() is None for r in refs] == [True] * 4
    assert logits.shape == (8, 4) and not logits.requires_grad and terms.shape == (3,)


class FakeCudaEvent:
    """Stands in for torch.cuda.Event on a CPU-only machine: each pair spans 5 GPU milliseconds."""

    synchronized = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        FakeCudaEvent.synchronized += 1

    def elapsed_time(self, end: "FakeCudaEvent") -> float:
        return 5.0


def test_data_wait_on_a_gpu_is_measured_with_events_read_at_log_time():
    """Host time around next() says nothing about an asynchronous GPU loader: the events' time is reported,
    and the host waits for them only when the value is read."""
    import time

    from fastcd.engine.timing import DataWait

    wait = DataWait(torch.device("cuda"), event=FakeCudaEvent)
    for _ in range(3):
        wait.start()
        time.sleep(0.02)  # host time that must not be counted
        wait.stop()
    assert FakeCudaEvent.synchronized == 0
    assert wait.read() == pytest.approx(0.015) and FakeCudaEvent.synchronized == 1
    cpu = DataWait(torch.device("cpu"))
    cpu.start()
    time.sleep(0.02)
    cpu.stop()
    assert cpu.read() >= 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_data_wait_sees_gpu_work_the_host_does_not_wait_for():
    from fastcd.engine.timing import DataWait

    wait = DataWait(torch.device("cuda"))
    torch.cuda.synchronize()
    wait.start()
    torch.cuda._sleep(200_000_000)  # a GPU loader's enqueued work: the host returns at once
    wait.stop()
    assert wait.read() > 0.01


# --- issue 19: checks before anything is deleted, durable checkpoints, one-line errors, quiet traps ---


def _teacher_checkpoint(path: Path) -> str:
    """A fastcd checkpoint of an untrained tiny ResNet-34 (the tiny config's teacher), as teacher weights."""
    from fastcd.config import config_from_dict
    from fastcd.models import build_resnet
    from fastcd.utils.checkpoint import save_checkpoint

    t = tiny_dict("")["teacher"]
    cfg = config_from_dict({"student": {k: v for k, v in t.items() if k != "weights"}, "teacher": None})
    save_checkpoint(path, {"config": cfg.to_dict(), "model": build_resnet("resnet34", 4, "cifar", 0.0625).state_dict()})
    return str(path)


def test_force_checks_every_cached_epoch_before_deleting_the_previous_run(tiny_config, tmp_path):
    """A damaged cache epoch used to be found when that epoch started: after --force had deleted the old run
    and training had replaced its checkpoint."""
    losses = "loss_list=[{loss_name: CELoss}, {loss_name: CDLoss, loss_rate: 6}]"
    base = ("train.epochs=2", "train.max_steps_per_epoch=2", losses,
            f"teacher.weights={_teacher_checkpoint(tmp_path / 'teacher.pt')}")
    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump(tiny_config(*base).to_dict()))
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    old = tiny_config(*base)
    train(old)
    before = {name: (old.out_path / name).read_bytes() for name in ("latest.pt", "best.pt", "metrics.jsonl")}
    (cache / "epoch-0001" / "means.npy").write_bytes(b"")  # the second epoch's file is damaged
    with pytest.raises(FastcdError, match=r"epoch-0001.*cannot be read"):
        train(tiny_config(*base, f"teacher.cache={cache}"), force=True)
    assert {name: (old.out_path / name).read_bytes() for name in before} == before


def _undecodable_copy(prepared: Path, out: Path) -> tuple[Path, str]:
    """A copy of `prepared` whose train sample 5 (not its shard's first, which opening checks) is no longer a
    JPEG: sizes, sample table and manifest unchanged. Returns the copy and the sample's shard tar."""
    shutil.copytree(prepared, out)
    table = read_table(out / "train" / "samples.npy")
    assert table[5, OFFSET] > table[table[:, SHARD] == table[5, SHARD], OFFSET].min()
    tar = out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][table[5, SHARD]]["tar"]
    with open(tar, "r+b") as f:
        f.seek(int(table[5, OFFSET]))
        f.write(b"\0\0")
    return out, str(tar)


@pytest.mark.parametrize("decode,workers", [("workers", 0), ("workers", 1), ("device", 0)])
def test_force_puts_the_previous_run_back_when_a_sample_does_not_decode(prepared, tmp_path, decode, workers):
    """`--force` with data that fails mid-epoch: the error is one line naming the shard and the sample (from a
    worker process too), and the previous run's files are back as they were. A later --force that succeeds
    leaves no copy of the run it replaced."""
    raw = prepared_dict(str(tmp_path / "run"), prepared, workers)
    raw["data"]["decode"] = decode
    good = config_from_dict(raw)
    train(good)
    out = good.out_path
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"latest.pt", "best.pt"} <= set(before)
    bad, tar = _undecodable_copy(prepared, tmp_path / "bad")
    with pytest.raises(FastcdError) as e:
        train(config_from_dict(raw, [f"data.path={bad}"]), force=True)
    assert re.fullmatch(rf"sample 000000005 in shard {re.escape(tar)} cannot be decoded \(.+\): the prepared data is "
                        rf"damaged; run `fastcd prepare --verify {re.escape(str(bad))}`", str(e.value)), str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    train(good, force=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".replaced-")]


def test_checkpoints_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """After a power loss, a renamed but unsynced latest.pt can be empty and has already replaced the good one."""
    from fastcd.utils.checkpoint import save_checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    save_checkpoint(tmp_path / "latest.pt", {"model": {"w": torch.ones(3)}})
    (_, synced), (_, tmp, target), (_, folder) = events
    assert synced == tmp and tmp.startswith(str(tmp_path / ".latest.pt.")) and target == str(tmp_path / "latest.pt")
    assert folder == str(tmp_path) and len(events) == 3


@pytest.mark.parametrize("failure", ["enospc", "dev_full"])
def test_a_full_disk_while_checkpointing_is_a_one_line_error_that_keeps_the_last_checkpoint(tiny_config, monkeypatch,
                                                                                           failure):
    """torch.save on a full disk used to end the run with torch's `enforce fail ... unexpected pos` traceback."""
    import builtins
    import errno

    import fastcd.utils.checkpoint as checkpoint

    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=2")
    train(cfg, stop_after_epoch=1)
    good = (cfg.out_path / "latest.pt").read_bytes()
    if failure == "enospc":  # what torch.save does when a write fails: some bytes out, then the OSError
        def save(obj, f):
            f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint.torch, "save", save)
    else:  # torch's own writer, on a device that is always full
        if not os.path.exists("/dev/full"):
            pytest.skip("needs /dev/full")
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(FastcdError, match=r"^no space left writing '.*latest.pt' \(No space left on device\)"):
        train(cfg, resume=True)
    assert (cfg.out_path / "latest.pt").read_bytes() == good
    assert not list(cfg.out_path.glob(".latest.pt.*"))  # no temporary file left behind


def test_an_output_folder_that_is_a_file_is_a_one_line_error(tiny_config, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(FastcdError, match=f"cannot create folder '{out}': '{tmp_path / 'file'}' is a file"):
            train(tiny_config(f"train.out_dir={out}"))


def test_an_atomic_output_under_a_file_is_a_one_line_error(tmp_path):
    from fastcd.utils.atomic import atomic_write_json

    (tmp_path / "file").write_text("x")
    with pytest.raises(FastcdError, match="cannot create folder '.*file/sub': '.*file' is a file"):
        atomic_write_json(tmp_path / "file" / "sub" / "table.json", {})


def test_cache_teacher_out_that_is_a_file_is_a_one_line_error(tiny_config, tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config("train.epochs=1").to_dict()))
    (tmp_path / "file").write_text("x")
    assert main(["cache-teacher", str(cfg_path), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "cannot create cache folder (--out)" in err and str(tmp_path / "file") in err and err.count("\n") == 1


def test_eval_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    """A whole pickled module used to print torch's 6-line advice to load it with weights_only=False."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    (tmp_path / "text.pt").write_text("hello\n")
    for name in ("module.pt", "text.pt"):
        assert main(["eval", str(cfg_path), "--checkpoint", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name}' is not a fastcd checkpoint" in err and err.count("\n") == 1, err


def test_sigterm_is_reported_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """SIGTERM used to end the process with status 143 and nothing printed."""
    import signal
    import time

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    proc = subprocess.Popen([sys.executable, "-m", "fastcd.cli", "train", str(cfg_path), "--set", "train.epochs=50",
                             "train.max_steps_per_epoch=2"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "latest.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    latest = str(tmp_path / "run" / "latest.pt")
    assert err.strip().splitlines()[-1] == (f"fastcd train: terminated (SIGTERM); the last checkpoint is {latest!r} "
                                            "(continue with --resume)")
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["epoch"] >= 1


@pytest.mark.parametrize("command,options", [
    ("fastcd.commands.cache_teacher", ["config.yaml", "--epochs", "0"]),
    ("fastcd.commands.demo", ["--epochs", "0"]),
    ("fastcd.commands.demo", ["--teacher-epochs", "0"]),
    ("fastcd.commands.repro", ["fashion-mnist", "--epochs", "0"]),
    ("fastcd.commands.train", ["config.yaml", "--stop-after", "0"]),
])
def test_zero_epochs_is_refused_not_read_as_the_default(command, options, capsys):
    """`--epochs 0` used to fall back to the default (`args.epochs or ...`) and train or cache epochs anyway."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(command).add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(options)
    assert "must be at least 1, got 0" in capsys.readouterr().err


def test_a_session_with_nothing_to_train_is_refused_and_leaves_the_folder_alone(tiny_config):
    """`--resume --stop-after 2` at epoch 2 used to train epoch 3; `--resume` with fewer train.epochs trained
    nothing but rewrote config.yaml and run.json."""
    base = ("train.epochs=3", "train.max_steps_per_epoch=1")
    cfg = tiny_config(*base)
    train(cfg, stop_after_epoch=2)
    files = {p.name: p.read_bytes() for p in cfg.out_path.iterdir()}
    cases = [((), 2, r"--stop-after 2: the run in '.*run' is already at epoch 2; nothing to train"),
             ((), 1, r"--stop-after 1: the run .* is already at epoch 2"),
             (("train.epochs=1",), None, r"train.epochs=1 but the run in '.*run' is already at epoch 2: nothing to "
                                         r"train, the folder is left as it is"),
             (("train.epochs=2",), None, r"has finished its train.epochs=2 epochs: nothing to train")]
    for overrides, stop, message in cases:
        with pytest.raises(FastcdError, match=message):
            train(tiny_config(*base, *overrides), resume=True, stop_after_epoch=stop)
        assert {p.name: p.read_bytes() for p in cfg.out_path.iterdir()} == files
    assert [r["epoch"] for r in train(cfg, resume=True, stop_after_epoch=3)] == [1, 2, 3]


def test_resume_and_force_together_are_refused(tiny_config):
    cfg = tiny_config("train.epochs=2", "train.max_steps_per_epoch=1")
    train(cfg, stop_after_epoch=1)
    first = (cfg.out_path / "latest.pt").read_bytes()
    with pytest.raises(FastcdError, match="--resume continues the run .* --force deletes that run .* not both"):
        train(cfg, resume=True, force=True)
    assert (cfg.out_path / "latest.pt").read_bytes() == first


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again(tiny_config, monkeypatch):
    """Its folder (config.yaml, run.json, metrics.jsonl, no checkpoint) used to be refused by a plain rerun and
    unusable by --resume."""
    cfg = tiny_config("train.epochs=1", "train.max_steps_per_epoch=2", "train.log_every=1")
    real = CELoss.forward
    monkeypatch.setattr(CELoss, "forward", lambda self, s, y: s.float().sum() * float("nan"))
    with pytest.raises(FastcdError, match="non-finite loss at epoch 1, step 1.*no checkpoint yet"):
        train(cfg)
    monkeypatch.setattr(CELoss, "forward", real)
    assert not (cfg.out_path / "latest.pt").exists() and (cfg.out_path / "config.yaml").is_file()
    with pytest.raises(FastcdError, match="stopped before its first checkpoint: start it again without --resume"):
        train(cfg, resume=True)
    with pytest.raises(FastcdError, match=r"already holds a run of another config that stopped before its "
                                          r"first checkpoint \(metrics.jsonl, config.yaml, run.json\); replace "
                                          r"it with --force"):
        train(tiny_config("train.epochs=1", "train.max_steps_per_epoch=2", "optim.lr=0.01"))
    assert [r["epoch"] for r in train(cfg)] == [1]  # the same config starts again in its folder
    steps = [json.loads(x) for x in (cfg.out_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("step")) for r in steps] == [("step", 1), ("step", 2), ("epoch", None)]


def test_an_empty_config_says_data_path_is_unset(tmp_path, capsys):
    """It used to fail on "dataset folder 'train' does not exist"."""
    (tmp_path / "empty.yaml").write_text("")
    assert main(["train", str(tmp_path / "empty.yaml"), "--set", f"train.out_dir={tmp_path / 'run'}",
                 "teacher=null", "student.width=0.0625"]) == 2
    err = capsys.readouterr().err
    assert "data.path is empty" in err and err.count("\n") == 1


def test_every_config_field_is_either_kept_or_changeable_on_resume():
    """One explicit list: a new config field must be placed in exactly one of them."""
    import dataclasses
    import typing

    from fastcd.config import Config, LossSpec
    from fastcd.engine.resume import CHANGEABLE, KEPT, STEP_FIELDS

    def leaves(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(tp) or inner:
                yield from leaves(tp if dataclasses.is_dataclass(tp) else inner[0], f"{f.name}.")
            elif f.name == "loss_list":
                yield from (f"loss_list.{g.name}" for g in dataclasses.fields(LossSpec))
            else:
                yield prefix + f.name

    fields = list(leaves(Config, ""))
    placed = [*KEPT, *STEP_FIELDS, *CHANGEABLE]
    assert sorted(placed) == sorted(fields) and len(set(placed)) == len(placed)
