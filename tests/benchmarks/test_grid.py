"""P2 over the declared ranges (benchmarks/grid.py), its pure parts: which shapes are measured, how P2 is
aggregated, and when a shape counts as slower than the bare module. Nothing is timed here."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import grid
from esper.blueprint import Blueprint, Dim, Input


def blueprint(*shape: Dim | int, representative: tuple[dict[str, int], ...], buckets=None) -> Blueprint:  # type: ignore[no-untyped-def]
    return Blueprint(
        name="bp",
        version=1,
        build=lambda: torch.nn.Identity(),
        inputs=(Input("x", "float32", shape),),
        representative=representative,
        **({"buckets": buckets} if buckets else {}),
    )


def test_one_dim_gets_log_spaced_sizes_from_end_to_end() -> None:
    bp = blueprint(Dim("batch", 1, 16), 8, representative=({"batch": 4},))
    sizes = [s["batch"] for _, s in grid.range_grid(bp)]
    assert sizes == [1, 2, 4, 8, 16]  # 5 per dim, log-spaced: 16 ** (i / 4)


def test_two_dims_are_combined_and_bounded() -> None:
    bp = blueprint(Dim("batch", 1, 16), Dim("seq", 2, 96), 128, representative=({"batch": 4, "seq": 32},))
    pts = grid.range_grid(bp)
    batches = sorted({s["batch"] for _, s in pts})
    seqs = sorted({s["seq"] for _, s in pts})
    assert batches == [1, 2, 4, 8, 16]
    assert seqs[0] == 2 and seqs[-1] == 96 and len(seqs) == 5
    # Every combination, since 5 x 5 fits the budget: an independent count of the product.
    assert len(pts) == 25 and len({(s["batch"], s["seq"]) for _, s in pts}) == 25
    # A smaller budget drops points rather than exceeding it.
    assert len(grid.range_grid(bp, budget=10)) <= 10


def test_each_bucket_gets_its_own_grid_and_shared_edges_are_measured_once() -> None:
    bp = blueprint(
        Dim("batch", 1, 64),
        8,
        representative=({"batch": 4}, {"batch": 32}),
        buckets={"batch": ((1, 15), (16, 64))},
    )
    pts = grid.range_grid(bp)
    profiles = {p for p, _ in pts}
    assert len(profiles) == 2
    sizes = [s["batch"] for _, s in pts]
    assert len(sizes) == len(set(sizes))
    assert min(sizes) == 1 and max(sizes) == 64
    for profile, ranges in bp.profiles().items():
        inside = [s["batch"] for p, s in pts if p == profile]
        lo, hi = ranges["batch"]
        assert inside and all(lo <= b <= hi for b in inside)


def test_a_static_blueprint_has_its_one_shape() -> None:
    bp = blueprint(4, 8, representative=({},))
    assert grid.range_grid(bp) == (("default", {}),)


def test_points_hold_every_representative_and_grid_shape_interleaved() -> None:
    bp = blueprint(Dim("batch", 1, 16), 8, representative=({"batch": 3}, {"batch": 12}))
    pts = grid.points(bp)
    reps = [p for p in pts if p.kind == grid.REPRESENTATIVE]
    assert [p.sizes for p in reps] == [{"batch": 3}, {"batch": 12}]
    assert [p.sizes["batch"] for p in pts if p.kind == grid.GRID] == [1, 2, 4, 8, 16]
    where = [i for i, p in enumerate(pts) if p.kind == grid.REPRESENTATIVE]
    assert where[0] > 0 and where[-1] < len(pts) - 1  # spread among the grid's points, not bunched at an end
    assert where[1] - where[0] > 1


@pytest.mark.parametrize(("few", "many"), [(0, 5), (1, 5), (3, 5), (5, 2), (2, 0)])
def test_interleave_keeps_every_point_once_in_each_kinds_order(few: int, many: int) -> None:
    a = [grid.Point("a", grid.REPRESENTATIVE, {"n": i}) for i in range(few)]
    b = [grid.Point("b", grid.GRID, {"n": i}) for i in range(many)]
    out = grid.interleave(a, b)
    assert len(out) == few + many
    assert [p for p in out if p.blueprint == "a"] == a
    assert [p for p in out if p.blueprint == "b"] == b


def test_p2_is_the_geometric_mean() -> None:
    assert grid.p2([0.5, 0.8, 1.25]) == pytest.approx(math.exp((math.log(0.5) + math.log(0.8) + math.log(1.25)) / 3))
    assert grid.p2([0.5, 2.0]) == pytest.approx(1.0)
    assert grid.p2([]) is None


def test_slower_only_when_the_whole_interval_clears_the_tolerance_with_confidence() -> None:
    assert grid.slower_with_confidence(1.06, 0.96)
    assert not grid.slower_with_confidence(1.05, 0.96)  # on the line: not surely slower by more than 5%
    assert not grid.slower_with_confidence(1.01, 0.96)  # surely slower, but not by more than 5%
    assert not grid.slower_with_confidence(1.5, 0.5)  # too few rounds for 95%: nothing is decided


def test_the_coverage_comes_from_the_sign_test_over_the_rounds() -> None:
    """The measured interval is the one certification decides with: 2 rounds cover 50%, 15 rounds 95%."""
    from esper.certification.timing import median_interval

    assert median_interval([1.2, 1.3], 0.95)[2] == pytest.approx(0.5)
    low, _, coverage = median_interval([1.1 + i / 100 for i in range(grid.ROUNDS)], 0.95)
    assert coverage >= grid.CONFIDENCE and grid.slower_with_confidence(low, coverage)


def m(kind: str, label: str, ratio: float, low: float, high: float, coverage: float = 0.96) -> grid.Measured:
    return grid.Measured("bp", kind, label, ratio, low, high, coverage)


def test_summary_separates_representative_and_grid_and_names_the_slow_shapes() -> None:
    measured = [
        m(grid.REPRESENTATIVE, "batch=4", 0.5, 0.45, 0.55),
        m(grid.GRID, "batch=1", 1.2, 1.1, 1.3),  # slower with confidence
        m(grid.GRID, "batch=16", 0.3, 0.28, 0.33),
        m(grid.GRID, "batch=2", 1.2, 0.9, 1.5),  # slower in the median, not with confidence
        m(grid.GRID, "batch=8", 1.2, 1.1, 1.3, coverage=0.5),  # too few rounds to say
    ]
    s = grid.summarize(measured)
    assert s.representative == pytest.approx(0.5)
    assert s.grid == pytest.approx((1.2 * 0.3 * 1.2 * 1.2) ** (1 / 4))
    assert s.slower == ("bp[batch=1]",)
    assert s.points == 5


def test_acceptance_passes_within_the_targets_and_names_each_miss() -> None:
    ok = grid.Summary(representative=0.6, grid=0.79, slower=(), points=3)
    assert grid.acceptance_problems(ok) == []
    rep = grid.acceptance_problems(grid.Summary(0.66, 0.5, (), 3))
    assert len(rep) == 1 and "representative" in rep[0]
    over = grid.acceptance_problems(grid.Summary(0.5, 0.81, (), 3))
    assert len(over) == 1 and "grid" in over[0]
    slow = grid.acceptance_problems(grid.Summary(0.5, 0.5, ("bp[batch=1]",), 3))
    assert len(slow) == 1 and "bp[batch=1]" in slow[0]
    assert len(grid.acceptance_problems(grid.Summary(None, None, (), 0))) == 2


def test_markdown_reports_both_p2_and_marks_the_slow_shape() -> None:
    measured = [m(grid.REPRESENTATIVE, "batch=4", 0.5, 0.45, 0.55), m(grid.GRID, "batch=1", 1.2, 1.1, 1.3)]
    text = "\n".join(grid.markdown(grid.report(measured)))
    assert "representative shapes: 0.500" in text
    assert "grid of the declared ranges: 1.200" in text
    assert "| bp | grid | batch=1 |  | 0 | 1.20 [1.10-1.30]! | 96% |" in text
    assert "| bp | representative | batch=4 |  | 0 | 0.50 [0.45-0.55] | 96% |" in text
    assert grid.markdown({}) == []
