"""Size and value coverage (numerics.coverage, numerics.inputs): pure, deterministic, and complete where promised."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from esper.blueprint import Blueprint, Dim, Input
from esper.numerics.coverage import (
    EVERY_SIZE_CAP,
    VALUE_REGIMES,
    ValueCase,
    covering_array,
    edge_sizes,
    every_size,
    pair_count,
    pairwise,
    plan,
    spread,
    summarize,
)
from esper.numerics.inputs import make_inputs

ATTN = {"batch": (1, 16), "seq": (2, 128)}


def all_pairs(shapes: list[dict[str, int]], ranges: dict[str, tuple[int, int]]) -> set[tuple]:
    return {(a, s[a], b, s[b]) for s in shapes for a, b in itertools.combinations(ranges, 2)}


def test_edge_sizes_unchanged() -> None:
    assert edge_sizes({"batch": (1, 32)}) == [{"batch": 1}, {"batch": 32}, {"batch": 31}]
    assert edge_sizes({}) == [{}]


def test_every_size_tries_each_value_of_each_dim_once() -> None:
    shapes = every_size(ATTN, {"batch": 2, "seq": 16})
    rep = {"batch": 2, "seq": 16}
    for name, (lo, hi) in ATTN.items():
        assert {s[name] for s in shapes} == set(range(lo, hi + 1))
    assert all(sum(s[n] != rep[n] for n in ATTN) <= 1 for s in shapes)  # the others at the representative
    assert len(shapes) == len({tuple(s.items()) for s in shapes}) == 16 + 127 - 1  # (2, 16) appears once
    with pytest.raises(ValueError, match="seq"):
        every_size(ATTN, {"batch": 2})
    assert every_size({}, {}) == [{}]


def test_every_size_above_the_cap_keeps_ends_and_power_of_two_neighbours() -> None:
    values = {s["n"] for s in every_size({"n": (1, 5000)}, {"n": 7})}
    assert len(values) == EVERY_SIZE_CAP
    assert {1, 2, 4999, 5000, 63, 64, 65, 4095, 4096, 4097} <= values
    assert spread(3, 9, 100) == list(range(3, 10))
    assert spread(1, 5000, 10) == spread(1, 5000, 10)  # deterministic


@pytest.mark.parametrize(
    "values",
    [
        {"a": [1, 2, 3], "b": [4, 5]},
        {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9, 10]},
        {"a": list(range(6)), "b": list(range(5)), "c": list(range(4)), "d": list(range(3))},
    ],
)
def test_covering_array_holds_every_pair(values: dict[str, list[int]]) -> None:
    rows = covering_array(values)
    want = {(a, x, b, y) for a, b in itertools.combinations(values, 2) for x in values[a] for y in values[b]}
    got = {(a, r[a], b, r[b]) for r in rows for a, b in itertools.combinations(values, 2)}
    assert got == want and len(want) == pair_count(values)
    product = 1
    for v in values.values():
        product *= len(v)
    assert len(rows) <= product  # never worse than the full product...
    if len(values) > 2:
        assert len(rows) < product  # ...and smaller beyond two dims


def test_pairwise_is_complete_when_affordable_and_a_thinned_cover_otherwise() -> None:
    small = {"batch": (1, 8), "seq": (2, 20)}
    shapes = pairwise(small)
    assert len(shapes) == 8 * 19
    assert all_pairs(shapes, small) == {("batch", b, "seq", s) for b in range(1, 9) for s in range(2, 21)}
    big = pairwise(ATTN, budget=256)
    assert len(big) <= 256
    for name, (lo, hi) in ATTN.items():
        assert {lo, hi} <= {s[name] for s in big}
    assert pairwise({"batch": (1, 64)}) == []
    assert pairwise(ATTN, budget=256) == big


def test_plan_covers_every_size_edges_and_regimes() -> None:
    reps = [{"batch": 2, "seq": 16}, {"batch": 16, "seq": 64}]
    cases = plan(ATTN, reps, seeds=2)
    assert cases == plan(ATTN, reps, seeds=2)
    shapes = [dict(c.sizes) for c in cases]
    for name, (lo, hi) in ATTN.items():
        assert {s[name] for s in shapes} == set(range(lo, hi + 1))
    for full in [*reps, *edge_sizes(ATTN)]:
        got = {(c.values.regime, c.values.seed) for c in cases if dict(c.sizes) == full}
        assert got == {(r, k) for r in VALUE_REGIMES for k in range(2)}
    # the sweep is about the smallest representative; sweep shapes get two seeds, pairwise shapes one
    sweep = set(map(lambda s: tuple(s.items()), every_size(ATTN, {"batch": 2, "seq": 16})))
    full = {tuple(s.items()) for s in [*reps, *edge_sizes(ATTN)]}
    for c in cases:
        key = tuple(c.sizes.items())
        if key not in full:
            want = 2 if key in sweep else 1
            assert sum(tuple(d.sizes.items()) == key for d in cases) == want
    # every regime meets many sizes of each dim
    per_regime = {r: {c.sizes["seq"] for c in cases if c.values.regime == r} for r in VALUE_REGIMES}
    assert all(len(v) > 30 for v in per_regime.values())
    cov = summarize(cases, ATTN)
    assert cov.values_tried == {"batch": (16, 16), "seq": (127, 127)}
    assert cov.shapes == len({tuple(s.items()) for s in shapes})
    assert cov.value_cases == len(cases)
    assert cov.pairs_total == 16 * 127 and 0 < cov.pairs_covered <= cov.pairs_total
    assert set(cov.regimes) == set(VALUE_REGIMES)
    json.dumps(cov.evidence())


def test_plan_keeps_to_its_profile() -> None:
    """A bucketed profile gets only its own representative shapes, and every case lies inside its ranges."""
    bucket = {"batch": (5, 64)}
    cases = plan(bucket, [{"batch": 2}, {"batch": 8}], seeds=1)
    assert all(5 <= c.sizes["batch"] <= 64 for c in cases)
    assert {c.sizes["batch"] for c in cases} == set(range(5, 65))
    assert sum(c.sizes["batch"] == 8 for c in cases) == len(VALUE_REGIMES)  # the representative: every regime
    assert all(5 <= c.sizes["batch"] <= 64 for c in plan(bucket, [{"batch": 2}], seeds=1))


def test_plan_for_a_static_blueprint() -> None:
    cases = plan({}, [{}], seeds=3)
    assert {dict(c.sizes).__repr__() for c in cases} == {"{}"}
    assert len(cases) == 3 * len(VALUE_REGIMES)
    assert summarize(cases, {}).pairs_total == 0


BP = Blueprint(
    name="values_probe",
    version=1,
    build=lambda: torch.nn.Identity(),
    inputs=(Input("x", "float32", (Dim("batch", 1, 4), 4096)), Input("i", "int64", (3,), low=0, high=5)),
    representative=({"batch": 2},),
)


def test_value_regimes_draw_what_they_say() -> None:
    def x(regime: str, seed: int = 0) -> torch.Tensor:
        return make_inputs(BP, {"batch": 2}, ValueCase(regime, seed))[0]

    assert 0.5 < x("unit").abs().mean() < 1.5
    assert x("tiny").abs().max() < 1e-2
    assert x("large").abs().mean() > 100
    assert (x("all-zeros") == 0).all()
    assert 0.3 < (x("some-zeros") == 0).float().mean() < 0.7
    m = x("mixed").abs()
    assert (m > 100).any() and ((m > 0) & (m < 1e-2)).any() and (m == 0).any()
    rows_mixed = ((m > 100).any(-1) & ((m > 0) & (m < 1e-2)).any(-1)).all()
    assert rows_mixed  # mixed inside one tensor, even inside one row
    assert torch.equal(x("mixed", 1), x("mixed", 1)) and not torch.equal(x("mixed", 1), x("mixed", 2))
    nf = x("nonfinite")
    assert [int(nf.isnan().sum()), int((nf == float("inf")).sum()), int((nf == float("-inf")).sum())] == [1, 1, 1]
    assert 0.5 < nf[nf.isfinite()].abs().mean() < 1.5  # the rest unit-scale
    same = torch.equal(x("nonfinite", 1).nan_to_num(), x("nonfinite", 1).nan_to_num())
    assert same and not torch.equal(x("nonfinite", 1).nan_to_num(), x("nonfinite", 2).nan_to_num())
    assert torch.equal(make_inputs(BP, {"batch": 1}, ValueCase("nonfinite", 0))[1].isfinite().all(), torch.tensor(True))
    ints = make_inputs(BP, {"batch": 1}, ValueCase("mixed", 0))[1]
    assert ints.dtype == torch.int64 and int(ints.min()) >= 0 and int(ints.max()) <= 5
    with pytest.raises(ValueError, match="unknown value regime"):
        make_inputs(BP, {"batch": 1}, ValueCase("huge", 0))
