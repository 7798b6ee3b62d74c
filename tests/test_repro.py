"""`fastcd repro fashion-mnist` end to end with a tiny budget: every row, both seeds, the report and its plot."""
import re

import pytest
import torch

from fastcd.cli import main
from fastcd.commands.repro import OPTIONAL, ROWS

TINY = ["data.batch_size=64", "student.width=0.0625", "teacher.width=0.0625", "data.res=16", "data.val_res=16"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (two spinning OpenMP threads per process crawl on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_repro_writes_the_report_with_every_row_and_the_plot(tmp_path, capsys):
    args = ["repro", "fashion-mnist", "--seeds", "2", "--epochs", "2", "--teacher-epochs", "1", "--train-subset",
            "128", "--val-subset", "64", "--out", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report")]
    assert main(args + [a for o in TINY for a in ("--set", o)]) == 0
    (md,) = (tmp_path / "report").glob("repro-fashion-mnist-*.md")
    text = md.read_text()
    for exp in ROWS + OPTIONAL:
        line = next(x for x in text.splitlines() if x.startswith(f"| {exp.label} |"))
        top1, top5 = line.split(" | ")[2:4]
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", top1) and re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", top5), line
    assert "--train-subset 128" in text and "commit" in text and "cpu" in text
    assert text.count("vs the student alone") == len(ROWS) + len(OPTIONAL) - 2 and "the teacher" in text
    assert md.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for seed in (0, 1):
        assert (tmp_path / "runs" / f"seed{seed}" / "teacher" / "best.pt").is_file()
        lines = (tmp_path / "runs" / f"seed{seed}" / "cd" / "metrics.jsonl").read_text().splitlines()
        assert sum('"kind": "epoch"' in line for line in lines) == 2
    assert "report:" in capsys.readouterr().out


def test_repro_rejects_bad_arguments(tmp_path, capsys):
    assert main(["repro", "fashion-mnist", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_experiments_refuse_a_previous_run_before_training_anything(tmp_path, capsys):
    from fastcd.commands.repro import CONFIGS
    from fastcd.errors import FastcdError
    from fastcd.experiments import run_experiments

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "metrics.jsonl").write_text("")
    with pytest.raises(FastcdError, match="student' already holds a run .*--force"):
        run_experiments(CONFIGS, ROWS[:2], tmp_path, [])
    assert not (tmp_path / "teacher").exists()
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
