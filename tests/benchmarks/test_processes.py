"""P2's points across fresh processes (benchmarks/processes.py) and the grid's options it drives: how the points
of several processes are matched and counted, and the child's command line. Nothing is timed here."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import grid, processes
from esper.blueprint import Blueprint, Dim, Input


def point(
    label: str, ratio: float, low: float, *, kind: str = grid.REPRESENTATIVE, coverage: float = 0.96
) -> dict[str, Any]:
    return {
        "blueprint": "bp",
        "kind": kind,
        "label": label,
        "ratio": ratio,
        "low": low,
        "high": ratio * 1.05,
        "coverage": coverage,
        "path": "compiled",
    }


def test_points_are_matched_across_processes_and_slower_ones_counted() -> None:
    runs = [
        [point("batch=2", 1.20, 1.12), point("batch=8", 0.50, 0.45), point("batch=4", 0.9, 0.8, kind=grid.GRID)],
        [point("batch=2", 0.80, 0.70), point("batch=8", 0.55, 0.50), point("batch=4", 0.9, 0.8, kind=grid.GRID)],
        # Slower by the ratio, but too few rounds for the confidence: not counted.
        [point("batch=2", 1.30, 1.20, coverage=0.80), point("batch=8", 0.52, 0.47)],
    ]
    s = processes.spread(runs)
    by_label = {p.label: p for p in s.points}
    flaky, steady, partial = by_label["batch=2"], by_label["batch=8"], by_label["batch=4"]
    assert flaky.ratios == (1.20, 0.80, 1.30) and flaky.slower_in == 1 and flaky.processes == 3
    assert flaky.spread == pytest.approx(1.30 / 0.80) and flaky.median == 1.20
    assert steady.slower_in == 0
    assert partial.processes == 2  # missing from the third process: judged over the two it ran in
    assert [p.label for p in s.slower_somewhere] == ["batch=2"]
    assert s.p2_representative[0] == pytest.approx((1.20 * 0.50) ** 0.5)
    assert s.p2_grid == (pytest.approx(0.9), pytest.approx(0.9), None)
    text = "\n".join(processes.markdown(s, openmp_team=True))
    assert "3 fresh processes beside a parked OpenMP team" in text
    assert "at least one process: 1 of 3" in text
    assert "| bp | representative | batch=2 | compiled | 1.20, 0.80, 1.30 | 1.62 | 1 of 3 |" in text


def test_the_child_runs_the_grid_with_the_same_options(tmp_path: Path) -> None:
    opts = argparse.Namespace(
        urza=tmp_path / "urza.db",
        rounds=7,
        calls=3,
        blueprints=[tmp_path / "bps"],
        k=["swiglu", "lora_adapter"],
        kind=[grid.REPRESENTATIVE],
        openmp_team=True,
    )
    cmd = processes.grid_command(opts, tmp_path / "0.json")
    assert cmd[1:3] == ["-m", "benchmarks.grid"]
    # The child's options are the grid's own, each the value given here.
    child = grid.arguments().parse_args(cmd[3:])
    assert vars(child) == {**vars(opts), "json": tmp_path / "0.json"}


def test_one_process_or_no_urza_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        processes.main(["--processes", "1", "--urza", str(tmp_path / "urza.db")])
    assert e.value.code == 2 and "at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        processes.main(["--urza", str(tmp_path / "missing.db")])
    assert e.value.code == 2 and "no Urza at" in capsys.readouterr().err


def test_the_grid_measures_only_the_kinds_asked_for() -> None:
    bp = Blueprint(
        name="bp",
        version=1,
        build=lambda: torch.nn.Identity(),
        inputs=(Input("x", "float32", (Dim("batch", 1, 16), 8)),),
        representative=({"batch": 4},),
    )
    both = grid.points(bp)
    assert {p.kind for p in both} == {grid.REPRESENTATIVE, grid.GRID}
    assert [p.sizes for p in grid.points(bp, kinds=[grid.REPRESENTATIVE])] == [{"batch": 4}]
    assert [p.kind for p in grid.points(bp, kinds=[grid.GRID])] == [grid.GRID] * (len(both) - 1)
    with pytest.raises(ValueError, match="unknown kind of point"):
        grid.points(bp, kinds=["everything"])


def test_a_parked_openmp_team_waits_until_released() -> None:
    release = grid.park_openmp_team()
    parked = [t for t in threading.enumerate() if t.name == "parked-openmp-team"]
    assert parked and parked[-1].is_alive()
    release.set()
    parked[-1].join(timeout=10)
    assert not parked[-1].is_alive()
