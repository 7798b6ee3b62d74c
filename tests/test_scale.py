"""bench/scale.py: the full-size rehearsal's measurements, and the whole rehearsal at a tiny size (so it cannot
rot; the full size is `fastcd bench scale`, a benchmark, not a test)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from fastcd.bench.scale import bytes_per_sample, exponents, run_stage
from fastcd.cli import main

HOG = """
import os, sys, time
data = bytearray(200 * 2**20)  # 200 MiB of own memory, touched
for i in range(0, len(data), 4096):
    data[i] = 1
if os.fork() == 0:  # a child the stage's process never reaps: its CPU time still counts
    end = time.process_time() + 1.0
    while time.process_time() < end:
        pass
    time.sleep(30)
time.sleep(float(sys.argv[1]))
"""


def test_a_stage_is_measured_from_outside_with_its_children(tmp_path: Path) -> None:
    usage, _, code = run_stage([sys.executable, "-c", HOG, "3"], tmp_path / "log")
    assert code == 0
    assert usage.own_peak_mib >= 190  # the forked child shares the pages: counted once (PSS), not twice
    assert usage.own_peak_mib < 400
    assert usage.cpu_seconds >= 0.8  # the unreaped child's busy second
    assert usage.seconds >= 3


def test_a_stage_is_killed_with_its_session_when_told(tmp_path: Path) -> None:
    start = time.perf_counter()
    usage, _, code = run_stage([sys.executable, "-c", HOG, "60"], tmp_path / "log",
                               stop_when=lambda: time.perf_counter() - start > 1.5)
    assert code == -9 and usage.seconds < 10


def test_growth_exponents_and_bytes_per_sample() -> None:
    sizes = [{"samples": 100, "stages": {"a": {"seconds": 1.0, "own_peak_mib": 100.0}}},
             {"samples": 1000, "stages": {"a": {"seconds": 10.0, "own_peak_mib": 200.0}}},
             {"samples": 10000, "stages": {"a": {"seconds": 1000.0, "own_peak_mib": 200.0}}}]
    assert exponents(sizes, "seconds") == [{"a": 1.0}, {"a": 2.0}]
    assert bytes_per_sample(sizes) == [{"a": round(100 * 2**20 / 900, 1)}, {"a": 0.0}]


def rehearse(tmp_path: Path, *argv: str) -> dict:
    """`fastcd bench scale` at 1/1000 of ImageNet (1,000 + 50 images); the stages' rows."""
    assert main(["bench", "scale", "--sizes", "0.001", "--root", str(tmp_path / "root"), "--out", str(tmp_path),
                 "--workers", "2", "--batch", "32", "--photo-images", "0", *argv]) == 0
    (result,) = json.loads(next(tmp_path.glob("*-scale.json")).read_text())
    (size,) = result["sizes"]
    assert size["train_images"] == 1000 and size["val_images"] == 50
    assert_rows(size["stages"])
    return size["stages"]


def assert_rows(stages: dict) -> None:
    """Every stage ran and was measured."""
    for name, row in stages.items():
        assert "failed" not in row, (name, row)
        assert row["seconds"] > 0 and row["own_peak_mib"] >= 0, name


def test_the_data_stages_at_a_tiny_size(tmp_path: Path) -> None:
    stages = rehearse(tmp_path, "--stages", "scan,prepare,rerun,rehash,resume,loaders", "--loaders", "feed",
                      "--ranks", "1,8", "--loader-images", "512")
    assert set(stages) == {"scan", "prepare", "rerun", "rehash", "resume", "loader feed x1", "loader feed x8"}
    assert stages["scan"]["files"] == {"train": 1000, "val": 50}
    assert stages["prepare"]["disk_mib"] > 0
    assert stages["resume"]["same_output"] is True and stages["resume"]["killed_after_s"] > 0
    assert stages["loader feed x1"]["images"] >= 512 and stages["loader feed x1"]["images_per_s"] > 0
    assert stages["loader feed x8"]["samples_per_epoch"] == 1000 // 8 // 32 * 32  # rank 0's share, full batches
    assert stages["loader feed x8"]["epoch1_setup_s"] > 0


@pytest.mark.slow
def test_every_stage_at_a_tiny_size(tmp_path: Path) -> None:
    stages = rehearse(tmp_path, "--loaders", "torch,feed,dali,ffcv", "--ranks", "1,8", "--loader-images", "512")
    loaders = {f"loader {b} x{r}" for b in ("torch", "feed", "dali", "ffcv") for r in (1, 8)}
    assert set(stages) == {"scan", "prepare", "rerun", "verify", "rehash", "resume", *loaders, "cache-teacher",
                           "cache read", "train", "train resume", "checkpoint", "eval"}
    assert stages["cache-teacher"]["bytes_per_sample"] > 2000  # 1,000 fp16 logits a sample
    assert stages["cache read"]["images"] == 1000 // 32 * 32  # the full batches of epoch 0
    assert stages["train resume"]["resumed_after_step"] == 5 and stages["train resume"]["first_step_s"] > 0
    assert stages["checkpoint"]["checkpoint_mib"] > 0 and stages["checkpoint"]["write_s"] > 0


@pytest.mark.parametrize("argv", [["--sizes", "2"], ["--stages", "prepare,nope"], ["--loaders", "mxnet"]])
def test_bad_options_are_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "scale", *argv])
    assert "error: argument" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_full_size_rehearsal(tmp_path: Path) -> None:
    """The benchmark itself (about 40 minutes on 2 cores, 10 GB of disk): every stage at 1/100, 1/10 and full
    size runs and gives the same prepared data after a kill; its times are the record's, not asserted here."""
    root = Path(os.environ.get("FASTCD_SCALE_ROOT", tmp_path / "root"))
    assert main(["bench", "scale", "--root", str(root), "--out", str(tmp_path)]) == 0
    (result,) = json.loads(next(tmp_path.glob("*-scale.json")).read_text())
    assert [s["train_images"] for s in result["sizes"]] == [12809, 128118, 1281167]
    for size in result["sizes"]:
        assert_rows(size["stages"])
        assert size["stages"]["resume"]["same_output"] is True
    assert {row["max_side"] for row in result["photo_like"]} == {256, 400, 512}


def test_two_rehearsals_on_one_root_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Its stages delete and rewrite the folders under --root: a second one there is one line, and touches
    nothing."""
    from fastcd.bench.scale import LOCK_NAME
    from fastcd.data_prep.outdir import locked

    with locked(tmp_path, LOCK_NAME, "fastcd bench scale", "--root"):
        assert main(["bench", "scale", "--sizes", "0.001", "--root", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being written by another `fastcd bench scale`" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
