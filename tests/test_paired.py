"""Paired seed-by-seed differences of a comparison's rows (gkd/report/paired.py)."""

import pytest

from gkd.report.paired import paired_differences, render_paired


def _row(method: str, seeds: list[int], dusk: list[float], day: list[float]) -> dict:
    return {
        "method": method,
        "label": method.upper(),
        "seeds": seeds,
        "miou": {"dusk": {"values": dusk}, "day_test": {"values": day}},
    }


def test_differences_are_taken_seed_by_seed_on_common_seeds():
    rows = [
        _row("teacher", [0], [30.0], [40.0]),
        _row("no_kd", [0, 1, 2], [15.0, 16.0, 17.0], [30.0, 29.0, 28.0]),
        _row("gkd", [2, 0, 1], [18.0, 14.0, 17.5], [27.0, 31.0, 29.0]),  # seeds listed out of order on purpose
    ]
    paired = paired_differences(rows, "gkd", ["dusk", "day_test"])
    assert [entry["method"] for entry in paired] == ["teacher", "no_kd"]
    teacher, no_kd = paired
    assert teacher["seeds"] == [0] and teacher["domains"]["dusk"]["differences"] == [14.0 - 30.0]
    # seed 2: 18 - 17, seed 0: 14 - 15, seed 1: 17.5 - 16 (gkd's seed order)
    assert no_kd["domains"]["dusk"]["differences"] == [1.0, -1.0, 1.5]
    assert no_kd["domains"]["dusk"]["wins"] == 2
    assert no_kd["domains"]["dusk"]["mean"] == pytest.approx(0.5)
    assert no_kd["domains"]["day_test"]["differences"] == [-1.0, 1.0, 0.0]
    assert no_kd["domains"]["day_test"]["wins"] == 1  # a tie is not a win
    table = render_paired(paired, "GKD", ["dusk", "day_test"])
    assert "| NO_KD | 3 | +0.5, 2 of 3 | +0.0, 1 of 3 |" in table.splitlines()
    with pytest.raises(KeyError, match="no row 'cwd'"):
        paired_differences(rows, "cwd", ["dusk"])
