"""A fastcd command killed with SIGKILL leaves no process behind (issue 34): its loader workers, the fork server
that forked them, prepare's worker pool and what they started all end by themselves within seconds.

The processes are found by a marker in their environment, which every process the command starts inherits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fastcd.utils.lifeline import end_with_parent
from tests.conftest import prepared_dict

GONE_S = 10  # the most a helper may outlive the process that started it
START_S = 120  # for the command to start its helpers on a shared 2-core machine
FASTCD = ["-m", "fastcd.cli"]


def marked(marker: str) -> list[int]:
    """The live processes whose environment holds FASTCD_TEST_MARKER=`marker`."""
    needle, found = f"FASTCD_TEST_MARKER={marker}".encode() + b"\0", []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ, state = (entry / "environ").read_bytes(), (entry / "stat").read_text()
            except OSError:  # gone, or not ours to read
                continue
            if needle in environ and state.rpartition(")")[2].split()[0] != "Z":  # a zombie holds no memory
                found.append(int(entry.name))
    return found


def wait_for(condition, seconds: float, what: str) -> None:
    """Poll `condition` until it is true; fail naming `what` after `seconds`."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"{what} within {seconds:g} s")
        time.sleep(0.2)


def kill_mid_work(argv: list[str], helpers: int, cwd: Path) -> None:
    """Start `python ARGV...`, SIGKILL it once it runs `helpers` processes of its own, and check that none of them
    outlives it by GONE_S seconds; whatever is left is killed at the end."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "FASTCD_TEST_MARKER": marker, "OMP_NUM_THREADS": "1"}
    log = open(cwd / "command.log", "w")
    proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    what = " ".join(argv[:3])
    try:
        wait_for(lambda: len(marked(marker)) > helpers or proc.poll() is not None, START_S,
                 f"{what} did not start {helpers} helper processes")
        assert proc.poll() is None, f"{what} ended before it was killed:\n{(cwd / 'command.log').read_text()}"
        left = set(marked(marker)) - {proc.pid}
        assert len(left) >= helpers
        proc.kill()
        proc.wait()
        wait_for(lambda: not marked(marker), GONE_S, f"processes {sorted(marked(marker))} of the killed "
                                                     f"{what} (of {sorted(left)}) did not end")
    finally:
        proc.kill()
        proc.wait()
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_killed_train_leaves_no_loader_worker_or_fork_server(tmp_path: Path, prepared: Path) -> None:
    raw = prepared_dict(str(tmp_path / "run"), prepared, workers=2)
    raw["train"]["epochs"] = 10_000
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    # the fork server, the training split's two workers and the resource tracker
    kill_mid_work([*FASTCD, "train", str(tmp_path / "train.yaml")], helpers=4, cwd=tmp_path)


def test_a_killed_cache_teacher_leaves_no_loader_worker(tmp_path: Path, prepared: Path) -> None:
    raw = prepared_dict(str(tmp_path / "run"), prepared, workers=2)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    command = [*FASTCD, "cache-teacher", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "cache"),
               "--epochs", "10000"]
    kill_mid_work(command, helpers=4, cwd=tmp_path)


def test_a_killed_prepare_leaves_no_pool_worker(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "src" / "train" / c).mkdir(parents=True)
        for i in range(1500):
            pixels = rng.integers(0, 256, (24, 24, 3), np.uint8)
            Image.fromarray(pixels).save(tmp_path / "src" / "train" / c / f"{i}.jpg")
    command = [*FASTCD, "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "2", "--quiet"]
    kill_mid_work(command, helpers=2, cwd=tmp_path)


FORKS = """
import os, time
from fastcd.cli import main
main(["configs"])  # the command's set-up, as any fastcd command has it
if os.fork() == 0:  # as ffcv's writer forks its workers
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def test_a_child_forked_by_a_fastcd_command_ends_with_it(tmp_path: Path) -> None:
    (tmp_path / "forks.py").write_text(FORKS)
    kill_mid_work([str(tmp_path / "forks.py")], helpers=1, cwd=tmp_path)


def test_end_with_parent_is_for_multiprocessing_children_only() -> None:
    with pytest.raises(RuntimeError, match="multiprocessing child"):
        end_with_parent()
