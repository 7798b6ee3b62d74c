"""DDP failure modes on 2 gloo ranks (torchrun on the CPU): a non-finite loss on one rank, a rank that stops
answering, the process group's lifetime and the order of the compile and DDP wrappers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import tiny_dict

# Runs `fastcd` under torchrun after an optional patch, then reports whether the process group survived.
LAUNCHER = """
import os, sys
import torch.distributed as dist
from fastcd.cli import main
{patch}
if __name__ == "__main__":  # not in a loader worker, which imports this script as its parent's main module
    code = main(sys.argv[1:])
    print(f"rank {{os.environ['RANK']}} exit {{code}} group {{'alive' if dist.is_initialized() else 'destroyed'}}",
          flush=True)
    sys.exit(code)
"""
NAN_ON_RANK_1 = """
if os.environ["RANK"] == "1":
    from fastcd.losses.ce import CELoss
    CELoss.forward = lambda self, s, y: s.float().sum() * float("nan")
"""


def launch(tmp_path: Path, patch: str, *overrides: str, command: tuple[str, ...] = ("train",)) -> subprocess.Popen:
    """torchrun, 2 processes, `fastcd <command>` on the tiny config with `overrides`; stdout/stderr to files."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(patch=patch))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *command,
                             str(cfg_path), "--set", *overrides], env=env, text=True,
                            stdout=open(tmp_path / "stdout", "w"), stderr=open(tmp_path / "stderr", "w"))


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    proc = launch(tmp_path, NAN_ON_RANK_1, "train.epochs=1")
    assert proc.wait(timeout=300) != 0
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    lines = [x for x in err.splitlines() if "fastcd train: error:" in x]
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]
    assert "non-finite loss at epoch 1, step 1 on rank 1: CELoss=nan" in lines[0]
    assert "rank 0 exit 2 group destroyed" in out and "rank 1 exit 2 group destroyed" in out


def test_a_rank_given_another_config_is_refused_by_name_on_every_rank(tmp_path):
    proc = launch(tmp_path, 'if os.environ["RANK"] == "1":\n    sys.argv.append("optim.lr=0.2")', "train.epochs=1")
    assert proc.wait(timeout=300) != 0
    err = (tmp_path / "stderr").read_text()
    lines = [x for x in err.splitlines() if "fastcd train: error:" in x]
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]
    assert "rank 1 has another config than rank 0 (optim.lr: 0.05 -> 0.2)" in lines[0]


def _worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    found = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = dict(item.split("=", 1) for item in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in item)
        if "RANK" in env:
            found[int(env["RANK"])] = int(child)
    return found


@pytest.mark.slow
def test_a_rank_that_stops_answering_is_named_after_the_timeout(tmp_path):
    proc = launch(tmp_path, "", "train.epochs=50", "train.log_every=1", "train.dist_timeout_s=5")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = _worker_pids(proc.pid)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while "stopped answering" not in (tmp_path / "stderr").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.kill(pids[1], signal.SIGCONT)
    proc.wait(timeout=60)
    err = (tmp_path / "stderr").read_text()
    assert "fastcd train: error: rank 1 stopped answering" in err and "train.dist_timeout_s=5" in err, err[-3000:]


def test_compile_wraps_ddp_not_the_other_way_round(tiny_config, tmp_path):
    """torch.compile(DDP(model)) keeps DDP's bucketing and overlap (dynamo splits the graph at the buckets)."""
    from torch.nn.parallel import DistributedDataParallel

    from fastcd.engine.runtime import Runtime
    from fastcd.engine.trainer import build_step

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rt = Runtime(torch.device("cpu"), world_size=2)  # the wrapping of a DDP run; one real rank
        _, step = build_step(tiny_config(), rt, steps_per_epoch=2, compile_mode="default")
    finally:
        dist.destroy_process_group()
    assert hasattr(step.model, "_orig_mod") and isinstance(step.model._orig_mod, DistributedDataParallel)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_the_collective_timeout_must_be_positive(tiny_config, value):
    from fastcd.errors import FastcdError

    with pytest.raises(FastcdError, match="train.dist_timeout_s must be > 0"):
        tiny_config(f"train.dist_timeout_s={value}")


def test_eval_under_torchrun_prints_once_and_leaves_the_group(tmp_path, tiny_config):
    from fastcd.engine.trainer import train

    cfg = tiny_config("train.epochs=1", "train.max_steps_per_epoch=1")
    train(cfg)
    proc = launch(tmp_path, "", "train.epochs=1", command=("eval", "--checkpoint", str(cfg.out_path / "best.pt")))
    assert proc.wait(timeout=300) == 0, (tmp_path / "stderr").read_text()[-3000:]
    out = (tmp_path / "stdout").read_text()
    assert out.count("top-1 error") == 1
    assert "rank 0 exit 0 group destroyed" in out and "rank 1 exit 0 group destroyed" in out


@pytest.mark.parametrize("error,collective", [
    (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                  "[127.0.0.1]:32971: Connection reset by peer. This is typically caused by a remote worker"), True),
    (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                  "waiting 3000ms for recv operation to complete"), True),
    (dist.DistBackendError("NCCL communicator was aborted on rank 0"), True),
    (RuntimeError("DataLoader timed out after 30 seconds"), False),
    (RuntimeError("connection reset while reading /data/shard-0003.tar (timeout)"), False),
    (ValueError("[x/gloo/transport/tcp/pair.cc:1] Connection reset"), False),
])
def test_only_collective_failures_count_as_such(error, collective):
    """A rank's own error that mentions a timeout is reported as itself, not as a lost peer."""
    from fastcd.engine.distributed import is_collective_failure

    assert is_collective_failure(error) is collective
