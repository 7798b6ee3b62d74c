"""Seed-format tables and paired comparisons over seeds (fastcd.report)."""
import math

import pytest

from fastcd.report import Row, paired, paired_table, seed_table


def _row(name: str, top1: list[float], seeds: list[int] | None = None, method: str = "") -> Row:
    seeds = list(range(len(top1))) if seeds is None else seeds
    return Row(name, method, seeds, top1, [0.5] * len(top1), [60.0] * len(top1))


def test_seed_table_fills_every_cell_and_drops_an_empty_method_column() -> None:
    with_method = seed_table([_row("a", [10.0, 11.0], method="teacher"), _row("b", [12.0], method="student")])
    without = seed_table([_row("a", [10.0, 11.0]), _row("b", [12.0])])
    assert "| Method |" in with_method and "Method" not in without
    for text in (with_method, without):
        for line in text.splitlines():
            assert "|  |" not in line and "| |" not in line, line
    assert "| a | teacher | 1-crop | 10.50 ± 0.71 | 0.50 ± 0.00 | 1.0 min |" in with_method
    assert "| b | 1-crop | 12.00 | 0.50 | 1.0 min |" in without


def test_seed_table_wall_cell_can_say_reused() -> None:
    row = _row("t", [9.0])
    row.wall = "reused"
    assert seed_table([row]).splitlines()[-1].endswith("| reused |")


def test_paired_differences_use_matching_seeds_and_a_t_interval() -> None:
    base = _row("base", [20.0, 21.0, 19.0])
    better = _row("cd", [18.0, 18.7, 17.2])  # -2.0, -2.3, -1.8
    p = paired(better, base)
    assert p.diffs == pytest.approx([-2.0, -2.3, -1.8])
    sd = math.sqrt(((0.0333) ** 2 + 0.2667 ** 2 + 0.2333 ** 2) / 2)
    assert p.mean == pytest.approx(-2.0333, abs=1e-4)
    assert p.half_width == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)
    assert p.verdict == "better"
    assert paired(base, better).verdict == "worse"
    assert paired(_row("noise", [20.5, 20.6, 19.1]), base).verdict == "same"
    shuffled = _row("cd", [17.2, 18.0, 18.7], seeds=[2, 0, 1])  # same runs, listed in another order
    assert paired(shuffled, base).diffs == pytest.approx([-1.8, -2.0, -2.3])


def test_paired_with_one_seed_has_no_interval() -> None:
    p = paired(_row("a", [10.0]), _row("b", [11.0]))
    assert math.isnan(p.half_width) and p.verdict == "one seed" and p.interval() == "-1.00"


def test_paired_refuses_rows_without_a_common_seed() -> None:
    with pytest.raises(ValueError, match="share no seed"):
        paired(_row("a", [10.0], seeds=[0]), _row("b", [11.0], seeds=[1]))


def test_paired_table_marks_the_reference_itself_and_gives_verdicts() -> None:
    base, cd = _row("base", [20.0, 21.0, 19.0]), _row("cd", [18.0, 18.7, 17.2])
    text = paired_table([base, cd], [base, cd])
    lines = text.splitlines()
    assert lines[0].count("verdict") == 2
    assert "| base | — | — | — | +2.00, +2.30, +1.80 |" in lines[2] and "worse" in lines[2]
    assert "| cd | -2.00, -2.30, -1.80 |" in lines[3] and "better" in lines[3]
