"""Routing by region (esper.certification.regions, run.choose_regions, Certification.compare_regions/select):
the grid across a profile's ranges, refinement where neighbours decide differently, the route table that
keeps compiled code exactly where it won, and the selection that routes a profile by its table. Every
comparison here is synthetic: no timing runs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import pytest

from esper.blueprint import Blueprint, Budget, Dim, Input
from esper.certification import regions, timing
from esper.certification.budgets import PROFILES
from esper.certification.results import CheckResult, Outcome
from esper.certification.run import (
    CANDIDATE_CHECKS,
    GRID_SECONDS,
    MARGIN,
    Certification,
    choose,
    choose_regions,
    outpaces,
)
from esper.kasmina import COMPILED
from esper.profiles import is_specialization
from esper.urza import Entry
from esper.urza.evidence import EAGER, ROUTE_TABLE, Meta, RegionCell, RouteTable, route_table

CPU = PROFILES["cpu-2core"]


def cmp(decision: str, ratio: float, eager_ms: float = 0.1) -> timing.Comparison:
    """A comparison as timing.compare returns one: 16 per-round ratios within 1% of ``ratio``."""
    return timing.Comparison(
        decision, ratio, ratio * 0.97, ratio * 1.03, MARGIN, 0.96, ratio * eager_ms / 1e3, eager_ms / 1e3,
        ratios=tuple(ratio * (1 + 0.01 * (k / 7.5 - 1)) for k in range(16)),
    )  # fmt: skip


def decide(ratio: float) -> str:
    """The oracle the synthetic timings follow: a win below 0.9, a loss above 1.05, even between."""
    return timing.WINS if ratio < 0.9 else timing.LOSES if ratio > 1.05 else timing.EVEN


# -- the grid -------------------------------------------------------------------------------------------------


def test_a_dims_sizes_are_log_spaced_across_its_range_with_the_ends_and_the_representative_sizes() -> None:
    g = regions.grid({"batch": (1, 64)}, [{"batch": 3}, {"batch": 50}])
    (values,) = g.values
    assert values[0] == 1 and values[-1] == 64 and {3, 50} <= set(values)
    assert len(values) <= regions.GRID_PER_DIM and list(values) == sorted(set(values))
    # Log-spaced: every gap between neighbours is at most a fixed factor, far below a linear grid's first one.
    assert max(b / a for a, b in itertools.pairwise(values)) <= 4
    assert g.points == tuple({"batch": v} for v in values)


def test_several_dims_make_a_product_thinned_to_the_budget_by_dropping_the_costliest_never_a_representative() -> None:
    reps = [{"b": 2, "s": 16}, {"b": 16, "s": 128}, {"b": 8, "s": 64}]
    g = regions.grid({"b": (1, 16), "s": (1, 128)}, reps, budget=9)
    assert all(r in g.points for r in reps)
    assert len(g.points) <= 9 + len(reps)
    assert all(v[0] == lo and v[-1] == hi for v, (lo, hi) in zip(g.values, [(1, 16), (1, 128)], strict=True))
    measured = [p for p in g.points if p not in reps]
    dropped = [p for p in g.product() if p not in g.points]
    assert dropped and max(math.prod(p.values()) for p in measured) <= min(math.prod(p.values()) for p in dropped)
    # Without a representative shape and within budget: every point of the product.
    small = regions.grid({"b": (1, 4), "s": (2, 8)}, [], budget=16)
    assert list(map(dict, small.points)) == small.product()


def test_refinement_adds_the_midpoint_only_where_neighbours_route_differently() -> None:
    g = regions.grid({"batch": (1, 64)}, [], per_dim=4)  # 1, 4, 16, 64
    assert g.values == ((1, 4, 16, 64),)
    decisions = {"batch=1": timing.WINS, "batch=4": timing.WINS, "batch=16": timing.LOSES, "batch=64": timing.EVEN}
    refined = regions.refine(g, decisions)
    assert refined.values == ((1, 4, 8, 16, 64),)  # only between 4 (wins) and 16 (loses); 16 -> 64 both eager
    assert [p for p in refined.points if p not in g.points] == [{"batch": 8}]
    assert regions.refine(g, dict.fromkeys(decisions, timing.WINS)) == g  # nothing flips: nothing added
    assert regions.refine(g, decisions, points=0) == g  # bounded


# -- the table ------------------------------------------------------------------------------------------------


def table_of(ratios: Mapping[int, float | None]) -> RouteTable:
    """A 1-D table over batch from synthetic ratios per grid size (``None``: not measured)."""
    g = regions.Grid(("batch",), (tuple(ratios),), tuple({"batch": b} for b, r in ratios.items() if r is not None))
    comparisons = {f"batch={b}": cmp(decide(r), r) for b, r in ratios.items() if r is not None}
    return regions.route_table(g, comparisons, margin=MARGIN)


def test_cells_serve_compiled_exactly_where_their_point_wins_and_say_why_elsewhere() -> None:
    table = table_of({1: 0.5, 4: 0.7, 16: 1.2, 32: 0.97, 64: None})
    assert [c.path for c in table.cells] == [COMPILED, COMPILED, EAGER, EAGER, EAGER]
    assert [c.decision for c in table.cells] == [timing.WINS, timing.WINS, timing.LOSES, timing.EVEN, None]
    assert table.cells[2].ratio == pytest.approx(1.2) and table.cells[2].low is not None
    assert "loses" in table.cells[2].why and "not measured" in table.cells[4].why
    assert [c.label for c in table.cells] == ["batch=1", "batch=4", "batch=16", "batch=32", "batch=64"]
    # A shape falls in the cell of the grid size nearest to it in log space (cut: the geometric midpoint).
    for size in range(1, 65):
        nearest = min((1, 4, 16, 32, 64), key=lambda v: (abs(math.log(size / v)), -v))
        assert table.cell_of({"batch": size}).sizes == {"batch": nearest}, size


def test_a_table_round_trips_and_unreadable_or_newer_tables_read_as_none() -> None:
    table = table_of({1: 0.5, 8: 1.2, 64: 0.8})
    again = RouteTable.from_json(table.to_json())
    assert again == table and again.describe() == "regional: compiled in 2 of 3 cells"
    assert Meta.from_json({ROUTE_TABLE: table.to_json()}).route_table == table
    raw = table.to_json()
    bad = [
        None,
        "compiled",
        {**raw, "version": 99},  # a newer layout: not guessed at
        {**raw, "cells": raw["cells"][:2]},  # cells do not fill the grid
        {**raw, "values": [[8, 1, 64]]},  # not ascending
        {**raw, "cells": [{**raw["cells"][0], "path": "fast"}, *raw["cells"][1:]]},
        {**raw, "dims": ["batch; import os"]},
    ]
    for value in bad:
        assert RouteTable.from_json(value) is None, value
    assert route_table({}) is None and route_table({"other": 1}) is None  # rows before tables: none


# -- the decision ---------------------------------------------------------------------------------------------

LABELS = ["batch=2", "batch=8"]


def scored_at(ratios: Mapping[str, float]) -> dict[str, timing.Comparison]:
    return {label: cmp(decide(r), r) for label, r in ratios.items()}


def grid_of(ratios: Mapping[int, float]) -> tuple[RouteTable, dict[str, timing.Comparison]]:
    comparisons = {f"batch={b}": cmp(decide(r), r) for b, r in ratios.items()}
    g = regions.Grid(("batch",), (tuple(ratios),), tuple({"batch": b} for b in ratios))
    return regions.route_table(g, comparisons, margin=MARGIN), comparisons


def test_a_loss_at_one_shape_costs_that_region_only() -> None:
    reps = {"batch=2": 0.5, "batch=8": 1.2}
    table, grid = grid_of({1: 0.5, 2: 0.5, 4: 0.7, 8: 1.2, 16: 1.3})
    scored = {"p/default": scored_at(reps)}
    assert choose("p", LABELS, scored, Budget(), CPU).winner is None  # the old rule: the whole profile eager
    d = choose_regions("p", LABELS, scored, {"p/default": table}, {"p/default": grid}, Budget(), CPU)
    assert d.winner == "p/default" and d.table == table
    assert "compiled in 3 of 5 cells" in d.note and "batch=8 (loses)" in d.note


def test_a_candidate_that_wins_nowhere_leaves_the_profile_eager_as_before() -> None:
    table, grid = grid_of({1: 1.2, 2: 0.97, 8: 1.1})
    scored = {"p/default": scored_at({"batch=2": 0.97, "batch=8": 1.1})}
    d = choose_regions("p", LABELS, scored, {"p/default": table}, {"p/default": grid}, Budget(), CPU)
    assert d.winner is None and d.table is None
    assert d == choose("p", LABELS, scored, Budget(), CPU)


def test_the_budget_judges_what_the_table_serves_at_each_representative_shape() -> None:
    table, grid = grid_of({1: 0.5, 2: 0.5, 8: 1.8})
    scored = {"p/default": scored_at({"batch=2": 0.5, "batch=8": 1.8})}  # 1.8x breaks the 1.5 ratio cap
    # The whole-profile rule vetoes the candidate for a shape its table sends to eager anyway ...
    assert choose("p", LABELS, scored, Budget(), CPU).winner is None
    # ... the regional rule judges eager there, and routes the candidate where it wins.
    d = choose_regions("p", LABELS, scored, {"p/default": table}, {"p/default": grid}, Budget(), CPU)
    assert d.winner == "p/default" and d.table == table and "batch=8 (loses)" in d.note
    # Over budget where the table serves compiled code (0.5x eager at batch 2 against a 0.4 ratio cap): not
    # routed anywhere.
    tight = Budget(max_ratio=0.4)
    assert choose_regions("p", LABELS, scored, {"p/default": table}, {"p/default": grid}, tight, CPU).winner is None


def test_of_two_winners_the_first_keeps_the_route_unless_the_second_is_faster_where_both_win() -> None:
    reps = {"batch=2": 0.7, "batch=8": 0.7}
    first, first_grid = grid_of({1: 0.7, 2: 0.7, 8: 0.7, 64: 1.2})
    close, close_grid = grid_of({1: 0.69, 2: 0.69, 8: 0.69, 64: 0.8})
    fast, fast_grid = grid_of({1: 0.3, 2: 0.3, 8: 0.3, 64: 1.2})
    scored = {"p/default": scored_at(reps), "p/freezing": scored_at(reps)}

    def winner(second: RouteTable, second_grid: dict[str, timing.Comparison]) -> Any:
        tables = {"p/default": first, "p/freezing": second}
        grids = {"p/default": first_grid, "p/freezing": second_grid}
        return choose_regions("p", LABELS, scored, tables, grids, Budget(), CPU)

    assert winner(close, close_grid).winner == "p/default"  # a hair faster where both win: not enough
    d = winner(fast, fast_grid)
    assert d.winner == "p/freezing" and d.table == fast
    assert "preferred to p/default" in d.note


# -- the check and the selection ------------------------------------------------------------------------------


def blueprint() -> Blueprint:
    return Blueprint(
        name="b",
        version=1,
        build=lambda: None,
        inputs=(Input("x", "float32", (Dim("batch", 1, 64), 4)),),
        representative=({"batch": 2}, {"batch": 8}),
        variants=("default",),
    )


class Kernel:
    route = COMPILED
    last_path = COMPILED


def certification(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, truth: Any, eager_ms: float = 0.1) -> Certification:
    """A certification of :func:`blueprint` whose one candidate passed every check, timed at the representative
    shapes by ``truth`` (batch -> ratio), with grid points compared by ``truth`` too (no timing runs)."""
    from esper.artifacts.compat import current

    cert = Certification(blueprint(), "inference", tmp_path / "urza.db", CPU)  # type: ignore[arg-type]
    (c,) = [c for c in cert.candidates.values() if not is_specialization(c.profile)]
    c.entry = Entry("b", 1, "h", current(), "aoti", "compiled", "0" * 64, 1, None, id=1)
    c.kernel = Kernel()
    c.comparisons = {f"batch={b}": cmp(decide(truth(b)), truth(b), eager_ms) for b in (2, 8)}
    for name in CANDIDATE_CHECKS:
        cert.outcomes[(name, c.id)] = CheckResult(name, Outcome.PASSED, candidate=c.id)
    measured: list[int] = []

    def compare(self: Certification, c: Any, kernel: Any, sizes: Mapping[str, int], point: str) -> timing.Comparison:
        measured.append(sizes["batch"])
        return cmp(decide(truth(sizes["batch"])), truth(sizes["batch"]), eager_ms)

    monkeypatch.setattr(Certification, "_compare", compare)
    cert.measured = measured  # type: ignore[attr-defined]
    return cert


def test_the_grid_check_measures_the_grid_refines_and_selection_publishes_the_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    def truth(b: int) -> float:
        return 0.6 if b < 12 else 1.2  # compiled wins at small batches, loses from 12 on

    cert = certification(monkeypatch, tmp_path, truth)
    result = cert.compare_regions("default/default")
    assert result.passed, result.reason
    measured = cert.measured  # type: ignore[attr-defined]
    assert 2 not in measured and 8 not in measured  # the representative shapes are reused, not timed again
    assert {1, 64} <= set(measured) and len(measured) == len(set(measured))
    assert result.figures["measured"] == len(measured) + 2
    assert cert.select().passed
    d = cert.decisions["default"]
    assert d.winner == "default/default" and d.table is not None
    # Oracle: every grid cell is compiled exactly where the truth wins at its point; refinement put a point
    # between the last winning and the first losing size.
    for cell in d.table.cells:
        assert (cell.path == COMPILED) == (truth(cell.sizes["batch"]) < 0.9), cell
    (values,) = d.table.values
    last_win = max(v for v in values if truth(v) < 0.9)
    first_loss = min(v for v in values if truth(v) >= 0.9)
    assert first_loss / last_win < 2.1
    # The evidence written with the winner carries the table (Kasmina reads it from meta).
    evidence = cert.evidence(cert.candidates["default/default"], d, table=d.table)
    assert RouteTable.from_json(evidence["meta"][ROUTE_TABLE]) == d.table
    assert ROUTE_TABLE not in cert.evidence(cert.candidates["default/default"], d)["meta"]


def test_points_beyond_the_time_budget_are_left_unmeasured_and_run_eager(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # One call pair at batch 8 costs about GRID_SECONDS / 20: the largest sizes do not fit the budget.
    eager_ms = GRID_SECONDS * 1e3 / 20 / 2 / 8
    cert = certification(monkeypatch, tmp_path, lambda b: 0.5, eager_ms=eager_ms)
    assert cert.compare_regions("default/default").passed
    measured = cert.measured  # type: ignore[attr-defined]
    assert 64 not in measured and 1 in measured
    assert cert.select().passed
    table = cert.decisions["default"].table
    assert table is not None
    assert table.cell_of({"batch": 64}).path == EAGER and "not measured" in table.cell_of({"batch": 64}).why
    assert table.cell_of({"batch": 1}).path == COMPILED


def test_without_a_measured_grid_selection_keeps_the_representative_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    cert = certification(monkeypatch, tmp_path, lambda b: 0.5 if b == 2 else 1.2)
    assert cert.select().passed
    d = cert.decisions["default"]
    assert d.winner is None and d.table is None  # a loss at batch=8 keeps the whole profile eager, as before


def test_a_region_cell_labels_its_full_shape() -> None:
    assert RegionCell({"batch": 2, "seq": 16}, COMPILED).label == "batch=2,seq=16"


def test_the_evidence_reader_says_which_path_a_shape_takes_on_a_regional_route() -> None:
    from esper.artifacts.compat import current
    from esper.urza.evidence import Evidence

    t = table_of({1: 0.5, 8: 1.2, 64: 0.8})
    regional = Entry(
        "b", 1, "h", current(), "aoti", "certified", "0" * 64, 1, None, id=1, meta={ROUTE_TABLE: t.to_json()}
    )
    assert [Evidence.of(regional).path_at({"batch": b}) for b in (1, 2, 3, 8, 22, 23, 64)] == [
        COMPILED, COMPILED, EAGER, EAGER, EAGER, COMPILED, COMPILED
    ]  # fmt: skip
    everywhere = Entry("b", 1, "h", current(), "aoti", "certified", "0" * 64, 1, None, id=2)
    assert Evidence.of(everywhere).path_at({"batch": 8}) == COMPILED  # no table: compiled everywhere


# -- cells shared between candidates --------------------------------------------------------------------------


def faster(a: timing.Comparison, b: timing.Comparison) -> bool:
    return outpaces({"": a}, {"": b}, [""])


def shared_tables(
    truths: Mapping[str, Mapping[int, float]],
) -> tuple[dict[str, RouteTable], dict[str, dict[str, timing.Comparison]]]:
    tables, grids = {}, {}
    for cid, ratios in truths.items():
        tables[cid], grids[cid] = grid_of(ratios)
    return tables, grids


def test_each_cell_goes_to_the_candidate_that_wins_it_and_the_first_keeps_a_cell_both_win_alike() -> None:
    # default wins small batches, freezing large ones; at 8 both win alike (default keeps it), at 16 freezing
    # is faster by far, and at 64 neither wins.
    tables, grids = shared_tables(
        {
            "p/default": {1: 0.5, 2: 0.5, 8: 0.7, 16: 0.8, 32: 1.2, 64: 1.3},
            "p/freezing": {1: 1.2, 2: 0.95, 8: 0.69, 16: 0.3, 32: 0.4, 64: 1.1},
        }
    )
    shares = regions.share(tables, grids, faster)
    owner = {
        b: next((cid for cid, t in shares.items() if t.cell_of({"batch": b}).path == COMPILED), None)
        for b in range(1, 65)
    }
    for b, who in owner.items():
        point = min((1, 2, 8, 16, 32, 64), key=lambda v: (abs(math.log(b / v)), -v))
        want = {1: "p/default", 2: "p/default", 8: "p/default", 16: "p/freezing", 32: "p/freezing", 64: None}[point]
        assert who == want, b
    # A candidate is never compiled where its own table is not, and no cell is compiled twice.
    for cid, t in shares.items():
        for b in range(1, 65):
            if t.cell_of({"batch": b}).path == COMPILED:
                assert tables[cid].cell_of({"batch": b}).path == COMPILED, (cid, b)
    # A cell routed to the other candidate says so and keeps this candidate's own measurement.
    cell = shares["p/default"].cell_of({"batch": 16})
    assert cell.path == EAGER and "routed to p/freezing" in cell.why and cell.ratio == pytest.approx(0.8)
    assert cell.served_by == "p/freezing" and shares["p/freezing"].cell_of({"batch": 16}).served_by is None
    # Stored and read back, the cell still names who serves it (rows written before it name nobody).
    stored = RouteTable.from_json(shares["p/default"].to_json())
    assert stored is not None and stored.cell_of({"batch": 16}).served_by == "p/freezing"
    old_row = shares["p/default"].to_json()
    for raw in old_row["cells"]:
        raw.pop("served_by", None)
    assert RouteTable.from_json(old_row).cell_of({"batch": 16}).served_by is None  # type: ignore[union-attr]


def test_a_candidate_serves_a_cell_only_where_it_won_all_over_it_whatever_the_grids_refinement() -> None:
    # Random grids, refined differently per candidate: the union of their sizes makes cells that straddle a
    # candidate's own cut. Served sizes must lie inside the candidate's own compiled cells; a size where some
    # candidate's own cell wins is served unless that cell straddles another candidate's cut, so most are.
    import random

    rng = random.Random(7)
    for _ in range(200):
        truths = {}
        for cid in ("p/a", "p/b", "p/c"):
            sizes = sorted({1, 64, *rng.sample(range(2, 64), rng.randint(1, 5))})
            truths[cid] = {s: rng.choice([0.3, 0.6, 0.95, 1.2]) for s in sizes}
        tables, grids = shared_tables(truths)
        shares = regions.share(tables, grids, faster)
        served = 0
        for b in range(1, 65):
            at = [cid for cid, t in shares.items() if t.cell_of({"batch": b}).path == COMPILED]
            assert len(at) <= 1, (truths, b)
            if at:
                served += 1
                assert tables[at[0]].cell_of({"batch": b}).path == COMPILED, (truths, b)
        won = sum(1 for b in range(1, 65) if any(t.cell_of({"batch": b}).path == COMPILED for t in tables.values()))
        assert served <= won


def outside_own_cells(shares: Mapping[str, RouteTable], tables: Mapping[str, RouteTable]) -> list[int]:
    """Sizes some shared table serves compiled where that candidate's own table does not."""
    return [
        b
        for b in range(1, 65)
        for cid, t in shares.items()
        if t.cell_of({"batch": b}).path == COMPILED and tables[cid].cell_of({"batch": b}).path != COMPILED
    ]


def test_a_cell_that_straddles_a_candidates_own_cut_is_not_served_by_it_and_the_twin_that_looks_at_one_edge_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # default's cells: ..3, 4..15 (won at 8), 16.. (lost at 32). freezing measured 14 too, so the union cell of 14
    # is 11..21: inside default's winning cell up to 15, inside its losing one from 16.
    truths = {"p/default": {2: 0.5, 8: 0.5, 32: 1.3}, "p/freezing": {2: 0.3, 8: 1.2, 14: 1.2, 32: 1.3}}
    tables, grids = shared_tables(truths)
    shares = regions.share(tables, grids, faster)
    assert set(shares) == {"p/default", "p/freezing"} and shares["p/default"].values == ((2, 8, 14, 32),)
    assert shares["p/freezing"].cell_of({"batch": 2}).path == COMPILED  # faster by far where both win
    assert shares["p/default"].cell_of({"batch": 8}).path == COMPILED
    assert all(shares["p/default"].cell_of({"batch": b}).path == EAGER for b in range(11, 22))
    assert outside_own_cells(shares, tables) == []
    # The seeded defect: judging a union cell by the candidate's cell at one edge of it.
    monkeypatch.setattr(
        regions,
        "_covers",
        lambda table, box: [table.cell_of({d: lo for d, (lo, _) in zip(table.dims, box, strict=True)})],
    )
    assert outside_own_cells(regions.share(tables, grids, faster), tables) == list(range(16, 22))
    # Where one candidate serves every served cell, it keeps its own table, cut for cut.
    truths["p/freezing"] = {2: 1.2, 8: 1.2, 14: 1.2, 32: 1.3}
    tables, grids = shared_tables(truths)
    assert regions.share(tables, grids, faster) == {"p/default": tables["p/default"]}


def test_selection_shares_the_cells_and_names_every_routed_candidate() -> None:
    tables, grids = shared_tables(
        {"p/default": {1: 0.5, 2: 0.5, 8: 1.2, 64: 1.3}, "p/freezing": {1: 1.2, 2: 1.2, 8: 0.4, 64: 1.2}}
    )
    scored = {
        "p/default": scored_at({"batch=2": 0.5, "batch=8": 1.2}),
        "p/freezing": scored_at({"batch=2": 1.2, "batch=8": 0.4}),
    }
    d = choose_regions("p", LABELS, scored, tables, grids, Budget(), CPU)
    assert set(d.shares) == {"p/default", "p/freezing"} and d.winner in d.shares and d.table == d.shares[d.winner]
    assert d.routed() == dict(d.shares)
    # The ratio over the representative shapes is what each shape's serving candidate gives there.
    assert d.ratio == pytest.approx(math.sqrt(0.5 * 0.4))
    assert "shared by cell" in d.note and "eager in 1" in d.note
    # A kind whose runtime serves one entry per profile gets one candidate, as before.
    one = choose_regions("p", LABELS, scored, tables, grids, Budget(), CPU, shared=False)
    assert not one.shares and one.routed() == {one.winner: one.table}


def test_selection_publishes_every_candidate_that_serves_a_cell_and_kasmina_chooses_them_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The whole path on synthetic timings: two candidates that split the range are both certified, each with
    the cells routed to it, the cells it won on its own and the group's ids; Kasmina's chooser returns both, a
    seed's chooser only the one that keeps the weights swappable. The twin where one candidate is faster
    everywhere certifies that one alone and rejects the other by selection."""
    from dataclasses import replace as with_fields

    from esper.artifacts.compat import current
    from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
    from esper.kasmina.choose import choose_entries, choose_seed_entries
    from esper.urza import Urza
    from esper.urza.evidence import OWN_ROUTE_TABLE, own_route_table, route_group

    guards = GuardSchema(
        inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=64), DimGuard(size=4))),)
    )

    def certify(truths: Mapping[str, Any], urza_path: Any) -> Certification:
        bp = with_fields(blueprint(), variants=("default", "freezing"))
        cert = Certification(bp, "inference", urza_path, CPU)  # type: ignore[arg-type]
        with Urza(urza_path) as urza:
            for c in cert.candidates.values():
                if is_specialization(c.profile):
                    continue
                meta = {"swappable": c.variant == "default"}
                c.entry = urza.publish(
                    Entry(
                        "b",
                        1,
                        ("a" if c.variant == "default" else "b") * 64,
                        current(),
                        "aoti",
                        "compiled",
                        "0" * 64,
                        1,
                        guards,
                        variant=c.variant,
                        meta=meta,
                    )
                )
                c.kernel = Kernel()
                truth = truths[c.variant]
                c.comparisons = {f"batch={b}": cmp(decide(truth(b)), truth(b)) for b in (2, 8)}
                for name in CANDIDATE_CHECKS:
                    cert.outcomes[(name, c.id)] = CheckResult(name, Outcome.PASSED, candidate=c.id)

        def compare(
            self: Certification, c: Any, kernel: Any, sizes: Mapping[str, int], point: str
        ) -> timing.Comparison:
            r = truths[c.variant](sizes["batch"])
            return cmp(decide(r), r)

        monkeypatch.setattr(Certification, "_compare", compare)
        for cid in ("default/default", "default/freezing"):
            assert cert.compare_regions(cid).passed
        assert cert.select().passed
        from esper.certification.run import Check

        for name in (Check.SELECT, Check.BUDGETS):
            cert.outcomes[(name, None)] = CheckResult(name, Outcome.PASSED)
        assert cert.publish().passed
        return cert

    split = {"default": lambda b: 0.5 if b < 6 else 1.2, "freezing": lambda b: 0.4 if b >= 6 else 1.2}
    certify(split, tmp_path / "split.db")
    with Urza(tmp_path / "split.db") as urza:
        entries = urza.entries("b")
    assert {e.variant: e.status for e in entries} == {"default": "certified", "freezing": "certified"}
    by_variant = {e.variant: e for e in entries}
    ids = [by_variant["default"].id, by_variant["freezing"].id]
    for e in entries:
        assert route_group(e.meta) == tuple(ids) and OWN_ROUTE_TABLE in e.meta
        served, own = route_table(e.meta), own_route_table(e.meta)
        assert served is not None and own is not None
        for b in range(1, 65):
            if served.cell_of({"batch": b}).path == COMPILED:
                point = own.cell_of({"batch": b}).sizes["batch"]  # the grid point measured for this size
                assert own.cell_of({"batch": b}).path == COMPILED and split[e.variant](point) < 0.9, (e.variant, b)
    assert [e.id for e in choose_entries(entries, current())] == ids
    assert [e.id for e in choose_seed_entries(entries, current())] == ids[:1]  # freezing folds the weights
    # The twin: freezing faster everywhere both win, and default wins nowhere else: freezing alone.
    certify({"default": lambda b: 0.5, "freezing": lambda b: 0.2}, tmp_path / "one.db")
    with Urza(tmp_path / "one.db") as urza:
        entries = urza.entries("b")
    status = {e.variant: (e.status, e.failed_check) for e in entries}
    assert status == {"default": ("rejected", "selection"), "freezing": ("certified", None)}
    assert all(not route_group(e.meta) and OWN_ROUTE_TABLE not in e.meta for e in entries)
