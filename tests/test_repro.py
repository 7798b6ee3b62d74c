"""`fastcd repro fashion-mnist` and `fastcd demo` end to end with a tiny budget: every row of the seed's table,
the paired differences, the report and its plot; a finished teacher reused, not retrained."""
import json
import re
import statistics

import pytest

from fastcd.cli import main
from fastcd.commands.repro import CONFIGS, ROWS, SEED_TOP1

TINY = ["data.batch_size=64", "student.width=0.0625", "teacher.width=0.0625", "data.res=16", "data.val_res=16"]
TINY_ARGS = [a for o in TINY for a in ("--set", o)]
SEED_ROWS = ["ResNet18-B", "ResNet18.at", *(f"s_resnet18.t_resnet34.{k}" for k in (
    "kd.ce", "cd.ce", "cd.ce.lrdv1", "cd.ce.lrdv2", "cd.kd.lrdv2", "cd.kdv2.lrdv2"))]


def test_rows_are_the_seed_table_plus_teacher_fitnets_rkd() -> None:
    labels = [e.label for e in ROWS]
    assert labels[1:len(SEED_ROWS) + 1] == SEED_ROWS and list(SEED_TOP1) == SEED_ROWS
    assert labels[0] == "t_resnet34" and labels[-2:] == ["s_resnet18.t_resnet34.fitnets", "s_resnet18.t_resnet34.rkd"]
    for e in ROWS:
        assert (CONFIGS / f"{e.key}.yaml").is_file() and e.method


def test_repro_writes_the_report_with_every_row_paired_differences_and_the_plot(tmp_path, capsys) -> None:
    args = ["repro", "fashion-mnist", "--seeds", "2", "--epochs", "1", "--teacher-epochs", "1", "--train-subset",
            "128", "--val-subset", "64", "--out", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report")]
    assert main(args + TINY_ARGS) == 0
    (md,) = (tmp_path / "report").glob("repro-fashion-mnist-*.md")
    text = md.read_text()
    mean_sd = r"\d+\.\d\d ± \d+\.\d\d"
    for exp in ROWS:
        line = next(x for x in text.splitlines() if x.startswith(f"| {exp.label} | {exp.method} | 1-crop |"))
        top1, top5 = line.split(" | ")[3:5]
        assert re.fullmatch(mean_sd, top1) and re.fullmatch(mean_sd, top5), line
    paired_lines = [x for x in text.split("## Paired differences")[1].split("##")[0].splitlines() if x.startswith("| ")]
    assert len(paired_lines) == 2 + len(ROWS) - 1  # header, rule, every student
    for line in paired_lines[2:]:
        assert re.search(r"\| [+-]\d+\.\d\d, [+-]\d+\.\d\d \| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \| "
                         r"(better|worse|same) \|", line) or "| — | — | — |" in line, line
    ordering = text.split("## The seed's ordering against ours")[1].split("## Discussion")[0]
    assert ordering.count("| EDT (lrdv2) | s_resnet18.t_resnet34.cd.ce.lrdv2 vs s_resnet18.t_resnet34.cd.ce.lrdv1 | "
                          "-0.27 |") == 1
    assert "resolved and in the seed's direction" in ordering and "| 27.73 | 8 |" not in ordering
    assert "--train-subset 128" in text and "commit" in text and "CPU time" in text
    assert md.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for seed in (0, 1):
        run = tmp_path / "runs" / f"seed{seed}"
        assert (run / "t_resnet34" / "latest.pt").is_file() and (run / "teacher-cache" / "manifest.json").is_file()
        assert (run / "s_resnet18.t_resnet34.cd.ce" / "metrics.jsonl").read_text().count('"kind": "epoch"') == 1
        for key, cached in (("s_resnet18.t_resnet34.cd.kdv2.lrdv2", True), ("s_resnet18.t_resnet34.rkd", True),
                            ("s_resnet18.t_resnet34.at", False), ("s_resnet18.t_resnet34.fitnets", False)):
            config = (run / key / "config.yaml").read_text()
            assert (f"cache: {run / 'teacher-cache'}" in config) == cached, key
    assert "read by 7 rows instead of running the teacher" in text
    assert "report:" in capsys.readouterr().out


def test_repro_rejects_bad_arguments(tmp_path, capsys) -> None:
    assert main(["repro", "fashion-mnist", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_repro_budget_scales_epochs_with_minutes_and_seeds() -> None:
    import argparse

    from fastcd.commands.repro import BUDGET_MINUTES, EPOCHS, SEEDS, TEACHER_EPOCHS, epochs_for

    def args(**kw):
        base = {"seeds": SEEDS, "budget_minutes": BUDGET_MINUTES, "epochs": None, "teacher_epochs": None}
        return argparse.Namespace(**{**base, **kw})

    assert epochs_for(args()) == (EPOCHS, TEACHER_EPOCHS)
    assert epochs_for(args(budget_minutes=BUDGET_MINUTES / 2)) == (round(EPOCHS / 2), round(TEACHER_EPOCHS / 2))
    assert epochs_for(args(seeds=2 * SEEDS)) == (round(EPOCHS / 2), round(TEACHER_EPOCHS / 2))
    assert epochs_for(args(epochs=3, teacher_epochs=5)) == (3, 5)


def test_experiments_refuse_a_previous_run_before_training_anything(tmp_path, capsys) -> None:
    from fastcd.errors import FastcdError
    from fastcd.experiments import run_experiments

    (tmp_path / "s_resnet18.baseline").mkdir()
    (tmp_path / "s_resnet18.baseline" / "metrics.jsonl").write_text("")
    with pytest.raises(FastcdError, match="baseline' already holds a run .*--force"):
        run_experiments(CONFIGS, ROWS[:2], tmp_path, [])
    assert not (tmp_path / "t_resnet34").exists()
    (tmp_path / "seed0" / "s_resnet18.baseline").mkdir(parents=True)  # where the demo puts seed 0's student
    (tmp_path / "seed0" / "s_resnet18.baseline" / "metrics.jsonl").write_text("")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # the refusal names options the demo has (it has no --resume)
    assert "already holds a run" in err and "--force" in err and "--out" in err and "--resume" not in err
    assert not (tmp_path / "t_resnet34").exists()


def test_a_finished_teacher_of_the_same_config_is_reused_and_any_change_retrains(tmp_path, capsys) -> None:
    from fastcd.errors import FastcdError
    from fastcd.experiments import run_experiments

    common = ["train.epochs=1", "data.train_subset=128", "data.val_subset=64", "train.progress=false", *TINY]
    rows = ROWS[:2]
    first = run_experiments(CONFIGS, rows, tmp_path, common)
    latest = tmp_path / "t_resnet34" / "latest.pt"
    stamp = latest.stat().st_mtime_ns
    second = run_experiments(CONFIGS, rows, tmp_path, [*common, "train.log_every=5"], force=True)
    assert second[0].reused and not second[1].reused and latest.stat().st_mtime_ns == stamp
    assert second[0].history == first[0].history
    assert "reusing the finished run" in capsys.readouterr().out
    with pytest.raises(FastcdError, match="t_resnet34' already holds a run"):  # another config: not reusable
        run_experiments(CONFIGS, rows, tmp_path, [*common, "optim.lr=0.05"])
    fresh = run_experiments(CONFIGS, rows, tmp_path, common, force=True, fresh_teacher=True)
    assert not fresh[0].reused and latest.stat().st_mtime_ns != stamp


def test_rows_reading_the_teacher_cache_train_as_with_the_live_teacher(tmp_path, capsys) -> None:
    from fastcd.experiments import run_experiments

    common = ["train.epochs=2", "data.train_subset=128", "data.val_subset=64", "train.progress=false", *TINY]
    rows = [ROWS[0], *(e for e in ROWS if e.key.endswith(("cd.kdv2.lrdv2", ".rkd")))]
    live = run_experiments(CONFIGS, rows, tmp_path, common, seeds=[3])
    cached = run_experiments(CONFIGS, rows, tmp_path, common, seeds=[3], force=True, teacher_cache=True)
    assert "teacher targets from the cache" in capsys.readouterr().out
    assert cached[0].reused and cached[1].cache_seconds > 0 and cached[2].cache_seconds == 0
    for a, b in zip(live[1:], cached[1:], strict=True):
        assert b.config.teacher.cache == str(tmp_path / "seed3" / "teacher-cache") and not a.config.teacher.cache
        for ha, hb in zip(a.history, b.history, strict=True):
            assert ha["val_top1_err"] == hb["val_top1_err"]
            assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-4)


def test_a_teacher_stopped_early_is_not_reused(tmp_path) -> None:
    from fastcd.config import load_config
    from fastcd.engine.trainer import train
    from fastcd.experiments import finished_run

    cfg = load_config(CONFIGS / "t_resnet34.yaml", ["train.epochs=2", "data.train_subset=128", "data.val_subset=64",
                                                    "train.progress=false", f"train.out_dir={tmp_path}",
                                                    *[o for o in TINY if not o.startswith("teacher.")]])
    train(cfg, stop_after_epoch=1)
    assert finished_run(cfg) is None
    train(cfg, resume=True)
    assert finished_run(cfg) is not None


def _final_top1(run) -> float:
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
    return epochs[-1]["val_top1_err"]


def test_demo_trains_the_teacher_once_students_on_each_seed_and_reports_their_statistics(tmp_path, capsys) -> None:
    args = ["demo", "--out", str(tmp_path), "--seeds", "2", "--epochs", "1", "--teacher-epochs", "1",
            "--train-subset", "128", "--set", "data.val_subset=64", "--set", "train.progress=false", *TINY_ARGS]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"runs: {tmp_path / 't_resnet34'} (the teacher)" in out and f"this table: {tmp_path / 'table.md'}" in out
    assert (tmp_path / "table.md").read_text().strip().splitlines()[-1] == out.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0", "seed1", "t_resnet34", "table.md"]
    teacher = _final_top1(tmp_path / "t_resnet34")
    student = [_final_top1(tmp_path / f"seed{s}" / "s_resnet18.baseline") for s in (0, 1)]
    distilled = [_final_top1(tmp_path / f"seed{s}" / "s_resnet18.t_resnet34.cd.kdv2.lrdv2") for s in (0, 1)]
    for s in (0, 1):
        run = tmp_path / f"seed{s}"
        assert (run / "teacher-cache" / "manifest.json").is_file() and not (run / "t_resnet34").exists()
        config = (run / "s_resnet18.t_resnet34.cd.kdv2.lrdv2" / "config.yaml").read_text()
        assert f"cache: {run / 'teacher-cache'}" in config and f"seed: {s}" in config
        assert f"weights: {tmp_path / 't_resnet34' / 'latest.pt'}" in config
    table = [x for x in out.splitlines() if x.startswith("| ")]
    assert len(table) == 5
    assert table[2].startswith(f"| t_resnet34 | teacher, alone | 1-crop | {teacher:.2f} |")
    sd = statistics.stdev
    assert table[3].startswith(f"| ResNet18-B | student alone | 1-crop | {statistics.mean(student):.2f} ± "
                               f"{sd(student):.2f} |")
    assert table[4].startswith(f"| s_resnet18.t_resnet34.cd.kdv2.lrdv2 | CD+GKD+EDT | 1-crop | "
                               f"{statistics.mean(distilled):.2f} ± {sd(distilled):.2f} |")
    diffs = [d - s for d, s in zip(distilled, student)]
    half = 12.706 * sd(diffs) / 2 ** 0.5  # t(0.975, 1 degree of freedom)
    mean = statistics.mean(diffs)
    assert (f"same seed: {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] (mean [95% interval]; per seed: "
            f"{diffs[0]:+.2f}, {diffs[1]:+.2f})") in out
    wins = sum(d < 0 for d in diffs)
    assert f"CD+GKD+EDT beat the student alone on {wins} of 2 seeds" in out.strip().splitlines()[-1]
    assert main(args) == 2  # a used --out without --force: the refusal names the options demo has
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--force" in err and "--out" in err and "--resume" not in err
    assert main(args + ["--force"]) == 0
    again = capsys.readouterr().out
    assert "reusing the finished run" in again and re.search(r"\| t_resnet34 \|.*\| reused \|", again)
    assert "was not retrained" in again


def _rows(student: list[float], distilled: list[float]) -> list:
    from fastcd.report import Row

    return [Row("t_resnet34", seeds=[None], top1=[10.0]), Row("ResNet18-B", seeds=[0, 1, 2], top1=student),
            Row("s_resnet18.t_resnet34.cd.kdv2.lrdv2", seeds=[0, 1, 2], top1=distilled)]


def test_demo_summary_against_a_hand_computation() -> None:
    from fastcd.commands.demo import summary

    # differences -3, -2.5, -1.5: mean -2.33, stdev 0.76, half-width 4.303 * 0.7638 / sqrt(3) = 1.90;
    # teacher leads 4, 5, 3; shares closed 75%, 50%, 50%: mean 58.3%, half-width 4.303 * 14.43 / sqrt(3) = 35.9
    lines = summary(_rows([14.0, 15.0, 13.0], [11.0, 12.5, 11.5]))
    assert "same seed: -2.33 [-4.23, -0.44] (mean [95% interval]; per seed: -3.00, -2.50, -1.50)" in lines[0]
    assert "leads the student alone by 4.00 ± 1.00 points; CD+GKD+EDT closed 2.33 ± 0.76 of them, 58% [22%, 94%]" \
        in lines[1] and "per seed: 75%, 50%, 50%" in lines[1]
    assert lines[-1] == ("CD+GKD+EDT beat the student alone on 3 of 3 seeds, by 2.33 ± 0.76 points of top-1 error "
                         "(mean ± stdev over seeds); the 95% interval of the difference excludes 0.")
    # one seed lost (+0.5): mean -1.33, stdev 1.76, interval [-5.71, +3.04] holds 0
    last = summary(_rows([14.0, 15.0, 13.0], [11.0, 15.5, 11.5]))[-1]
    assert last.startswith("CD+GKD+EDT beat the student alone on 2 of 3 seeds (not on seed 1), by 1.33 ± 1.76")
    assert "holds 0, so at 3 seeds the demo does not show that CD+GKD+EDT helps" in last
    # the teacher behind the student alone on a seed: no share of a gap
    assert "does not lead the student alone on every seed" in summary(_rows([9.0, 15.0, 13.0], [8.0, 12.5, 11.5]))[1]


def test_demo_help_and_readme_state_the_same_time() -> None:
    import subprocess
    import sys
    from pathlib import Path

    helps = subprocess.run([sys.executable, "-m", "fastcd.cli", "demo", "--help"], capture_output=True, text=True,
                           check=True).stdout
    minutes = re.search(r"about (\d+) minutes on an idle 2-core CPU", " ".join(helps.split()))
    assert minutes, helps
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"make demo    # set up everything, then run the main job: a real, small distillation on the CPU " \
           f"(~{minutes[1]} min" in readme
