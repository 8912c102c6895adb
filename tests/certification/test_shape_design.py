"""The shape design (esper.numerics.coverage.shape_design): properties over drawn ranges, and the seeded
product-residue defect it must meet where a sweep of each dim does not."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from esper.numerics.coverage import (
    INDUCTOR_MODULI,
    edge_sizes,
    every_size,
    residue_design,
    shape_coverage,
    shape_design,
)


@st.composite
def ranges(draw: st.DrawFn, max_dims: int = 3) -> dict[str, tuple[int, int]]:
    n = draw(st.integers(1, max_dims))
    out = {}
    for k in range(n):
        lo = draw(st.integers(1, 40))
        out[f"d{k}"] = (lo, lo + draw(st.integers(0, 300)))
    return out


def reachable(rs: dict[str, tuple[int, int]], key: tuple[str, ...], m: int) -> set[int]:
    """An independent oracle: the residues the product can take, by brute force over every value."""
    return {math.prod(c) % m for c in itertools.product(*(range(rs[n][0], rs[n][1] + 1) for n in key))}


@settings(max_examples=40, deadline=None)
@given(rs=ranges())
def test_the_design_covers_every_reachable_residue_of_every_dim_and_pair_product(rs) -> None:  # type: ignore[no-untyped-def]
    shapes, coverage = shape_design(rs)
    names = list(rs)
    assert all(rs[n][0] <= s[n] <= rs[n][1] for s in shapes for n in names)
    assert all(e in shapes for e in edge_sizes(rs))
    keys = [(n,) for n in names] + list(itertools.combinations(names, 2))
    for m in INDUCTOR_MODULI:
        for key in keys:
            if math.prod(rs[n][1] - rs[n][0] + 1 for n in key) > 20_000:
                continue  # the brute-force oracle would be slow; the coverage count below still holds
            got = {math.prod(s[n] for n in key) % m for s in shapes}
            assert reachable(rs, key, m) <= got, (key, m)
    assert coverage.residues_covered == coverage.residues_total
    assert shape_design(rs) == (shapes, coverage)  # deterministic


@settings(max_examples=25, deadline=None)
@given(rs=ranges(max_dims=2).filter(lambda r: math.prod(hi - lo + 1 for lo, hi in r.values()) <= 256))
def test_small_profiles_get_every_pair_of_values(rs) -> None:  # type: ignore[no-untyped-def]
    shapes, coverage = shape_design(rs)
    assert coverage.method == "all-pairs"
    if len(rs) == 2:
        assert coverage.pairs_covered == coverage.pairs_total
    else:
        (name,) = rs
        assert {s[name] for s in shapes} == set(range(rs[name][0], rs[name][1] + 1))


def test_large_profiles_get_the_residue_design_within_a_small_budget() -> None:
    rs = {"batch": (1, 64), "seq": (1, 2048), "heads": (1, 32)}
    shapes, coverage = shape_design(rs)
    assert coverage.method == "residues" and len(shapes) <= 256
    assert coverage.residues_covered == coverage.residues_total
    assert {r.modulus for r in coverage.per_modulus} == set(INDUCTOR_MODULI)
    assert coverage.evidence()["per_modulus"]["64"][0] == coverage.evidence()["per_modulus"]["64"][1]
    assert residue_design(rs) == shapes


def test_the_residue_of_a_product_a_sweep_misses_is_met() -> None:
    """batch x seq % 16 == 11 (the product-residue fixture) at batch 1..64, seq 1..512: today's sweep of each
    dim at a representative other (batch 4, seq 8) has no shape in that class; the design has one, and the
    sweep's coverage report shows the product residues it misses."""
    rs = {"batch": (1, 64), "seq": (1, 512)}
    sweep = every_size(rs, {"batch": 4, "seq": 8})
    assert not any(s["batch"] * s["seq"] % 16 == 11 for s in sweep)
    shapes, _ = shape_design(rs)
    assert any(s["batch"] * s["seq"] % 16 == 11 for s in shapes)
    report = shape_coverage(sweep, rs)
    assert report.residues_covered < report.residues_total
