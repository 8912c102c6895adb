"""benchmarks.variant_split: what the entries' own comparisons would route if each cell went to its winner."""

from types import SimpleNamespace

import pytest

from benchmarks.variant_split import best_per_cell, routed_geomean, splits
from esper.artifacts.kinds import ArtifactKind
from esper.report import BlueprintEvidence, KindEvidence
from esper.urza.evidence import COMPILED, EAGER, RegionCell, RouteTable


def table(ratios: dict[int, float | None]) -> RouteTable:
    """A batch-only table: compiled where a ratio is given (it won there), eager where ``None``."""
    cells = tuple(
        RegionCell({"batch": b}, COMPILED if r is not None else EAGER, "wins" if r is not None else "loses", r)
        for b, r in ratios.items()
    )
    return RouteTable(("batch",), (tuple(ratios),), cells)


# Two variants that each win half of the range (the fast one at small batches, the other at large ones).
SMALL = table({2: 0.25, 8: 0.25, 32: None, 64: None})
LARGE = table({2: 0.5, 8: 0.5, 32: 0.64, 64: 0.64})


def test_routed_geomean_counts_eager_cells_as_one() -> None:
    assert routed_geomean(SMALL) == pytest.approx((0.25 * 0.25) ** 0.25)
    assert routed_geomean(LARGE) == pytest.approx((0.5 * 0.5 * 0.64 * 0.64) ** 0.25)


def test_per_cell_best_takes_each_cells_fastest_and_eager_where_none_compiles() -> None:
    best, served = best_per_cell({"small": SMALL, "large": LARGE})
    assert best == pytest.approx((0.25 * 0.25 * 0.64 * 0.64) ** 0.25)
    assert served == {"small": 2, "large": 2}
    none = table({2: None, 8: None, 32: None, 64: None})
    assert best_per_cell({"a": none, "b": none}) == (1.0, {"eager": 4})


def entry(variant: str, t: RouteTable, *, id: int, profile: str = "default"):
    """An entry as the report's reading gives it (only what the split reads)."""
    return SimpleNamespace(
        variant=variant, profile=profile, id=id, parity={}, performance={}, meta={"route_table": t.to_json()}
    )


def test_splits_set_the_routed_candidate_against_the_per_cell_best() -> None:
    large, small = entry("large", LARGE, id=4), entry("small", SMALL, id=3)
    alone = entry("large", LARGE, id=5, profile="batch=1-4")  # a profile with one candidate: nothing to split
    kind = KindEvidence(ArtifactKind.INFERENCE, (large, alone), (large, small, alone), None)
    [row] = splits([BlueprintEvidence("bp", (kind,))])
    assert (row.blueprint, row.artifact, row.profile) == ("bp", "inference", "default")
    assert row.routed is not None and row.routed.variant == "large"
    assert {c.variant: c.routed_geomean for c in row.candidates} == {
        "large": pytest.approx(routed_geomean(LARGE)),
        "small": pytest.approx(routed_geomean(SMALL)),
    }
    assert row.best_per_cell == pytest.approx((0.25 * 0.25 * 0.64 * 0.64) ** 0.25)
    assert row.best_per_cell < min(c.routed_geomean for c in row.candidates)  # better than either alone


def test_a_shared_route_is_read_by_the_cells_each_routed_candidate_serves() -> None:
    from esper.urza.evidence import OWN_ROUTE_TABLE, ROUTE_GROUP

    # Certification shared the profile: small serves batch 2 and 8, large 32 and 64 (stored tables), each with
    # the table it won on its own.
    served_small = table({2: 0.25, 8: 0.25, 32: None, 64: None})
    served_large = table({2: None, 8: None, 32: 0.64, 64: 0.64})

    def member(variant: str, own: RouteTable, served: RouteTable, id: int) -> SimpleNamespace:
        meta = {"route_table": served.to_json(), OWN_ROUTE_TABLE: own.to_json(), ROUTE_GROUP: [3, 4]}
        return SimpleNamespace(variant=variant, profile="default", id=id, parity={}, performance={}, meta=meta)

    small, large = member("small", SMALL, served_small, 3), member("large", LARGE, served_large, 4)
    kind = KindEvidence(ArtifactKind.INFERENCE, (small, large), (large, small), None)
    [row] = splits([BlueprintEvidence("bp", (kind,))])
    assert sorted(row.routed_variants) == ["large", "small"]
    # Each candidate alone is judged by its own table, and the route reaches the per-cell best.
    assert {c.variant: c.routed_geomean for c in row.candidates} == {
        "large": pytest.approx(routed_geomean(LARGE)),
        "small": pytest.approx(routed_geomean(SMALL)),
    }
    assert row.routed_per_cell == pytest.approx(row.best_per_cell)
    # The twin: one candidate routed over the whole profile serves its own ratios only.
    alone = entry("large", LARGE, id=4)
    kind = KindEvidence(ArtifactKind.INFERENCE, (alone,), (alone, entry("small", SMALL, id=3)), None)
    [row] = splits([BlueprintEvidence("bp", (kind,))])
    assert row.routed_per_cell == pytest.approx(routed_geomean(LARGE)) and row.routed_per_cell > row.best_per_cell
