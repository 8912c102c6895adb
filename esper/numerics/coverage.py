"""Which sizes and value cases of a shape profile must be tried: the edges every check includes, every size
of each dim, pairwise coverage of the dims, and the value regimes each shape meets.

Pure functions of the dim ranges (no hypothesis, no torch), shared by Tezzeret's compile-time checks and
certification. :mod:`esper.numerics.inputs` turns a :class:`ValueCase` into tensors.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Ranges = dict[str, tuple[int, int]]


def largest_prime_between(lo: int, hi: int) -> int | None:
    """The largest prime strictly between ``lo`` and ``hi`` (``None`` if there is none)."""
    for n in range(hi - 1, lo, -1):
        if n > 2 and all(n % d for d in range(2, int(n**0.5) + 1)):
            return n
    return None


def edge_sizes(ranges: Ranges) -> list[dict[str, int]]:
    """Shapes that must always be tried: every dim at its min, every dim at its max, and every dim at a
    prime strictly inside its range (an odd size where no prime fits), then min/max mixed."""
    if not ranges:
        return [{}]
    out = [{n: lo for n, (lo, _) in ranges.items()}, {n: hi for n, (_, hi) in ranges.items()}]
    inner = {}
    for n, (lo, hi) in ranges.items():
        odd = next((k for k in range(hi - 1, lo, -1) if k % 2), None)
        inner[n] = largest_prime_between(lo, hi) or odd or lo
    out.append(inner)
    if len(ranges) > 1:
        names = list(ranges)
        out.append({n: (ranges[n][0] if i == 0 else ranges[n][1]) for i, n in enumerate(names)})
    unique: list[dict[str, int]] = []
    for sizes in out:
        if sizes not in unique:
            unique.append(sizes)
    return unique


# ---------------------------------------------------------------------------------------------------------
# Full size coverage: every value of each dim, pairwise coverage of the dims, and the value cases per shape.
# ---------------------------------------------------------------------------------------------------------

Sizes = dict[str, int]

# A dim whose range holds at most this many values is tried at every one of them.
EVERY_SIZE_CAP = 300
# Pairwise coverage runs at most this many shapes; beyond it each dim's values are thinned (ends kept).
PAIR_BUDGET = 256


def _unique(shapes: Iterable[Mapping[str, int]]) -> list[Sizes]:
    seen: set[tuple[tuple[str, int], ...]] = set()
    out: list[Sizes] = []
    for s in shapes:
        key = tuple(s.items())
        if key not in seen:
            seen.add(key)
            out.append(dict(s))
    return out


def spread(lo: int, hi: int, count: int) -> list[int]:
    """At most ``count`` values of ``[lo, hi]`` (all of them if it holds no more), sorted and deterministic:
    up to half of them the ends, the values next to them and each power of two with its neighbours (where
    size-dependent code paths switch), the rest evenly spaced over the range."""
    n = hi - lo + 1
    if n <= count:
        return list(range(lo, hi + 1))
    powers = [1 << k for k in range(hi.bit_length() + 1)]
    special = [lo, lo + 1, hi - 1, hi, *(v for p in powers for v in (p - 1, p, p + 1) if lo <= v <= hi)]
    chosen = list(dict.fromkeys(special))[: max(count // 2, min(count, 4))]
    for k in range(count):
        if len(chosen) >= count:
            break
        v = lo + k * (n - 1) // max(count - 1, 1)
        if v not in chosen:
            chosen.append(v)
    return sorted(chosen)


def dim_values(lo: int, hi: int, cap: int = EVERY_SIZE_CAP) -> list[int]:
    """Every value of ``[lo, hi]`` when it holds at most ``cap``; else :func:`spread` of ``cap`` values."""
    return spread(lo, hi, cap)


def every_size(ranges: Ranges, representative: Mapping[str, int], cap: int = EVERY_SIZE_CAP) -> list[Sizes]:
    """Each dynamic dim at every value of its range (:func:`dim_values`: all of them up to ``cap`` values),
    the other dims at their ``representative`` size. Deterministic, deduplicated, in dim order."""
    missing = set(ranges) - set(representative)
    if missing:
        raise ValueError(f"representative shape lacks dims {sorted(missing)}")
    base = {n: int(representative[n]) for n in ranges}
    shapes: list[Sizes] = []
    for name, (lo, hi) in ranges.items():
        shapes += [{**base, name: v} for v in dim_values(lo, hi, cap)]
    return _unique(shapes) or [{}]


def pair_count(values: Mapping[str, Sequence[int]]) -> int:
    """How many value pairs of every two dims there are to cover."""
    names = list(values)
    return sum(len(values[a]) * len(values[b]) for a, b in itertools.combinations(names, 2))


def _pairs_of(shape: Mapping[str, int], names: Sequence[str]) -> set[tuple[str, int, str, int]]:
    return {(a, shape[a], b, shape[b]) for a, b in itertools.combinations(names, 2)}


def covering_array(values: Mapping[str, Sequence[int]]) -> list[Sizes]:
    """Shapes that hold every pair of values of every two dims at least once (a greedy, deterministic
    in-parameter-order construction); the full product for one or two dims."""
    names = list(values)
    if not names:
        return [{}]
    if len(names) == 1:
        return [{names[0]: v} for v in values[names[0]]]
    a, b = names[0], names[1]
    rows: list[Sizes] = [{a: x, b: y} for x in values[a] for y in values[b]]
    for k, new in enumerate(names[2:], start=2):
        earlier = names[:k]
        todo = {(p, v, new, w) for p in earlier for v in values[p] for w in values[new]}
        for row in rows:  # extend each row with the value of `new` that covers most missing pairs
            best = max(values[new], key=lambda w, row=row: sum((p, row[p], new, w) in todo for p in earlier))  # type: ignore[misc]
            row[new] = best
            todo -= {(p, row[p], new, best) for p in earlier}
        while todo:  # then add rows for the pairs still missing
            p, v, _, w = min(todo)
            row = {q: (v if q == p else values[q][0]) for q in earlier}
            row[new] = w
            for q in earlier:  # fill the free dims so the row covers more missing pairs
                if q != p:
                    row[q] = max(values[q], key=lambda u, q=q: (q, u, new, w) in todo)  # type: ignore[misc]
            rows.append(row)
            todo -= {(q, row[q], new, w) for q in earlier}
    return _unique({n: r[n] for n in names} for r in rows)


def pairwise(ranges: Ranges, *, cap: int = EVERY_SIZE_CAP, budget: int = PAIR_BUDGET) -> list[Sizes]:
    """Pairwise coverage of the dims: every pair of values (:func:`dim_values`) of every two dims, when the
    covering array fits ``budget`` shapes; otherwise each dim's values are thinned with :func:`spread`
    (ends, neighbours, powers of two kept) until it does: a deterministic covering sample. One dim or none:
    nothing to pair, see :func:`every_size`."""
    if len(ranges) < 2:
        return []
    per_dim = max(cap, 2)
    while True:
        values = {n: dim_values(lo, hi, per_dim) for n, (lo, hi) in ranges.items()}
        biggest = sorted((len(v) for v in values.values()), reverse=True)
        if biggest[0] * biggest[1] <= budget or per_dim <= 2:
            return covering_array(values)
        per_dim = max(2, min(per_dim - 1, int(per_dim * (budget / (biggest[0] * biggest[1])) ** 0.5)))


@dataclass(frozen=True)
class ValueCase:
    """How one case's input values are drawn: a regime name from :data:`VALUE_REGIMES` and a seed."""

    regime: str
    seed: int


# Unit, tiny and large magnitudes, exact zeros (some, all), magnitudes mixed inside one tensor, and NaN and
# +-inf placed among unit values.
VALUE_REGIMES = ("unit", "tiny", "large", "some-zeros", "all-zeros", "mixed", "nonfinite")


@dataclass(frozen=True)
class Case:
    """One parity case: the dim sizes and how the values are drawn."""

    sizes: Mapping[str, int]
    values: ValueCase


@dataclass(frozen=True)
class Coverage:
    """What a profile's cases covered, for the evidence: shapes and value cases run, the share of each
    dim's values tried, and the pairs of values of two dims covered out of all there are."""

    shapes: int
    value_cases: int
    values_tried: Mapping[str, tuple[int, int]]  # dim name -> (values tried, values in its range)
    pairs_covered: int
    pairs_total: int
    regimes: tuple[str, ...]

    def evidence(self) -> dict[str, Any]:
        """JSON-safe dict for Urza evidence."""
        return {
            "shapes": self.shapes,
            "value_cases": self.value_cases,
            "values_tried": {n: list(v) for n, v in self.values_tried.items()},
            "pairs_covered": self.pairs_covered,
            "pairs_total": self.pairs_total,
            "regimes": list(self.regimes),
        }


def plan(
    ranges: Ranges,
    representative: Sequence[Mapping[str, int]],
    *,
    seeds: int = 2,
    sweep_seeds: int | None = None,
    pair_seeds: int = 1,
    cap: int = EVERY_SIZE_CAP,
    budget: int = PAIR_BUDGET,
    regimes: Sequence[str] = VALUE_REGIMES,
) -> list[Case]:
    """The deterministic parity cases of a profile, cheapest to run in one batch per candidate:

    - every representative and edge shape (:func:`edge_sizes`) under every regime, ``seeds`` seeds each;
    - every other shape of :func:`every_size` (about the smallest representative shape, the cheapest),
      ``sweep_seeds`` cases each (default ``seeds``), and of :func:`pairwise`, ``pair_seeds`` each; the
      regimes rotate over the shapes so that every regime meets sizes of every part of every range.

    Representative shapes outside ``ranges`` (another bucket's) are left out; with none inside, the middle
    of each range stands in. Hypothesis-drawn cases come on top of these, as before."""
    inside = [r for r in representative if all(lo <= r[n] <= hi for n, (lo, hi) in ranges.items())]
    reps = [{n: int(r[n]) for n in ranges} for r in inside] or [{n: (lo + hi) // 2 for n, (lo, hi) in ranges.items()}]
    full = _unique([*reps, *edge_sizes(ranges)])
    smallest = min(reps, key=lambda r: math.prod(r.values()))
    sweep = [s for s in every_size(ranges, smallest, cap) if s not in full]
    pairs = [s for s in pairwise(ranges, cap=cap, budget=budget) if s not in full and s not in sweep]
    cases = [Case(s, ValueCase(r, k)) for s in full for r in regimes for k in range(seeds)]
    turn = 0
    for shapes, n in ((sweep, seeds if sweep_seeds is None else sweep_seeds), (pairs, pair_seeds)):
        for s in shapes:
            for k in range(n):
                cases.append(Case(s, ValueCase(regimes[turn % len(regimes)], k)))
                turn += 1
    return cases


def summarize(cases: Sequence[Case], ranges: Ranges) -> Coverage:
    """The :class:`Coverage` of ``cases`` over ``ranges``."""
    shapes = _unique(c.sizes for c in cases)
    tried = {n: len({s[n] for s in shapes if n in s}) for n in ranges}
    pairs = set().union(*(_pairs_of(s, list(ranges)) for s in shapes)) if shapes else set()
    total = sum((ra[1] - ra[0] + 1) * (rb[1] - rb[0] + 1) for ra, rb in itertools.combinations(ranges.values(), 2))
    return Coverage(
        shapes=len(shapes),
        value_cases=len(cases),
        values_tried={n: (tried[n], hi - lo + 1) for n, (lo, hi) in ranges.items()},
        pairs_covered=len(pairs),
        pairs_total=total,
        regimes=tuple(dict.fromkeys(c.values.regime for c in cases)),
    )


# ---------------------------------------------------------------------------------------------------------
# Shape design: every pair of values where affordable, else every residue of the extents compiled loops run.
# ---------------------------------------------------------------------------------------------------------

# The widths Inductor's generated loops step by: CPU vector lanes (4 for float64 or SSE float32, 8 for AVX2
# float32, 16 for AVX-512 float32 or AVX2 bfloat16) and the tile sizes of its tiled and reduction loops (32, 64).
# A kernel's remainder path runs for the extent modulo the width, so a defect in one shows at one residue.
# Covering every residue modulo 64 covers every residue modulo each divisor of it; the smaller widths are
# named for the coverage report.
INDUCTOR_MODULI = (4, 8, 16, 32, 64)


def _residues(values: Iterable[int], modulus: int) -> frozenset[int]:
    return frozenset(v % modulus for v in values)


def _extents(names: Sequence[str]) -> list[tuple[str, ...]]:
    """The extents a design covers residues of: each dim, the product of every two dims, and the product of
    all dims (when there are more than two): the flattened extents a compiled loop iterates over."""
    keys: list[tuple[str, ...]] = [(n,) for n in names]
    keys += [tuple(p) for p in itertools.combinations(names, 2)]
    if len(names) > 2:
        keys.append(tuple(names))
    return keys


def _extent_residues(ranges: Ranges, key: Sequence[str], modulus: int) -> frozenset[int]:
    """The residues modulo ``modulus`` that the product of ``key``'s dims can take inside ``ranges``."""
    reach = frozenset({1 % modulus})
    for name in key:
        lo, hi = ranges[name]
        dim = _residues(range(lo, min(hi, lo + modulus - 1) + 1), modulus)
        reach = frozenset((a * b) % modulus for a in reach for b in dim)
    return reach


def _value_with(lo: int, hi: int, residue: int, modulus: int) -> int | None:
    """The smallest value of ``[lo, hi]`` congruent to ``residue`` modulo ``modulus`` (``None`` if none)."""
    v = lo + (residue - lo) % modulus
    return v if v <= hi else None


@dataclass(frozen=True)
class ResidueCount:
    """Residues of the design's extents modulo one width: covered out of those the ranges can reach."""

    modulus: int
    covered: int
    total: int


@dataclass(frozen=True)
class ShapeCoverage:
    """What a shape design covers over a profile: its method (``all-pairs`` or ``residues``), its shapes, the
    value pairs of every two dims covered out of all there are, and the residues (of each dim, of every two
    dims' product and of all dims' product) covered out of those reachable, in total and per modulus."""

    method: str
    shapes: int
    pairs_covered: int
    pairs_total: int
    residues_covered: int
    residues_total: int
    per_modulus: tuple[ResidueCount, ...]

    def evidence(self) -> dict[str, Any]:
        """JSON-safe dict for Urza evidence."""
        return {
            "method": self.method,
            "shapes": self.shapes,
            "pairs_covered": self.pairs_covered,
            "pairs_total": self.pairs_total,
            "residues_covered": self.residues_covered,
            "residues_total": self.residues_total,
            "per_modulus": {str(r.modulus): [r.covered, r.total] for r in self.per_modulus},
        }


def shape_coverage(
    shapes: Sequence[Mapping[str, int]], ranges: Ranges, *, method: str = "", moduli: Sequence[int] = INDUCTOR_MODULI
) -> ShapeCoverage:
    """The :class:`ShapeCoverage` of any list of ``shapes`` over ``ranges`` (a design's, or a plan's)."""
    names = list(ranges)
    unique = _unique({n: s[n] for n in names} for s in shapes)
    pairs = set().union(*(_pairs_of(s, names) for s in unique)) if unique else set()
    pairs_total = sum(
        (ra[1] - ra[0] + 1) * (rb[1] - rb[0] + 1) for ra, rb in itertools.combinations(ranges.values(), 2)
    )
    counts: list[ResidueCount] = []
    for m in moduli:
        covered = total = 0
        for key in _extents(names):
            reach = _extent_residues(ranges, key, m)
            hit = {math.prod(s[n] for n in key) % m for s in unique}
            covered += len(hit & reach)
            total += len(reach)
        counts.append(ResidueCount(m, covered, total))
    return ShapeCoverage(
        method=method,
        shapes=len(unique),
        pairs_covered=len(pairs),
        pairs_total=pairs_total,
        residues_covered=sum(c.covered for c in counts),
        residues_total=sum(c.total for c in counts),
        per_modulus=tuple(counts),
    )


def residue_design(ranges: Ranges, *, moduli: Sequence[int] = INDUCTOR_MODULI) -> list[Sizes]:
    """Shapes inside ``ranges`` that cover, modulo the largest common multiple ``M`` of ``moduli`` (so modulo
    each of them), every residue each dim, the product of every two dims, and the product of all dims can
    take, plus the edges (:func:`edge_sizes`). Greedy and deterministic: while a residue is missing, the first
    missing one (in extent order) is realised with the smallest values that give it, and every other dim
    takes the value (smallest of its residue class) that covers most missing residues."""
    names = list(ranges)
    shapes = _unique(edge_sizes(ranges))
    if not names:
        return shapes
    m = math.lcm(*moduli)
    keys = _extents(names)
    # Every run plans every profile's design again (an unchanged one included), so the greedy search is kept
    # in array operations: a missing-residue mask per extent, and each extent's cheapest values per residue
    # worked out once.
    missing = {key: np.zeros(m, dtype=bool) for key in keys}
    for key in keys:
        missing[key][sorted(_extent_residues(ranges, key, m))] = True

    def cover(shape: Mapping[str, int]) -> None:
        for key in keys:
            missing[key][math.prod(shape[n] for n in key) % m] = False

    for s in shapes:
        cover(s)
    # One candidate value per reachable residue class of each dim: the smallest (the cheapest shape to run).
    candidates = {
        n: np.array([v for r in range(m) if (v := _value_with(lo, hi, r, m)) is not None], dtype=np.int64)
        for n, (lo, hi) in ranges.items()
    }
    cheapest: dict[tuple[str, ...], _Cheapest] = {}
    while any(mask.any() for mask in missing.values()):
        key = next(k for k in keys if missing[k].any())
        r = int(np.flatnonzero(missing[key])[0])
        if key not in cheapest:
            cheapest[key] = _Cheapest([candidates[n] for n in key], m)
        shape: dict[str, int] = dict(zip(key, cheapest[key].combo(r), strict=True))
        for n in names:
            if n in shape:
                continue
            # Only the extents that hold n and whose other dims are already set change with n's value.
            gain = np.zeros(len(candidates[n]), dtype=np.int64)
            for k in keys:
                if n in k and all(d in shape for d in k if d != n):
                    rest = math.prod(shape[d] for d in k if d != n)
                    gain += missing[k][(rest * candidates[n]) % m]
            best = gain.max()
            shape[n] = int(candidates[n][gain == best].min())
        shape = {n: shape[n] for n in names}
        cover(shape)
        shapes.append(shape)
    return _unique(shapes)


class _Cheapest:
    """The combinations of one extent's candidate values (one array per dim), by residue of their product
    modulo ``m``: :meth:`combo` gives the one with the smallest product, the smallest values first on a tie."""

    def __init__(self, values: Sequence[np.ndarray], m: int) -> None:
        grids = np.meshgrid(*values, indexing="ij")
        self.columns = [g.ravel() for g in grids]
        self.products = functools.reduce(np.multiply, self.columns)
        self.residues = self.products % m

    def combo(self, residue: int) -> tuple[int, ...]:
        at = self.residues == residue
        smallest = self.products[at].min()
        tied = np.flatnonzero(at & (self.products == smallest))
        return min(tuple(int(c[i]) for c in self.columns) for i in tied)


def shape_design(
    ranges: Ranges,
    *,
    budget: int = PAIR_BUDGET,
    cap: int = EVERY_SIZE_CAP,
    moduli: Sequence[int] = INDUCTOR_MODULI,
) -> tuple[list[Sizes], ShapeCoverage]:
    """A profile's covering design and its coverage report: every pair of values of every two dims (a
    covering array of :func:`dim_values`, with the edges) when that fits ``budget`` shapes, else
    :func:`residue_design`, and with its shapes added where the pairs leave a residue of a product of three dims
    or more out. One dim: every value when that fits ``budget``, else the residue design (every
    residue modulo each width, and the edges).

    Deterministic, and asked for again and again while a certification plans its modules (every run, an
    unchanged one included): computed once per process for each set of arguments, each caller given its own
    copy of the shapes."""
    shapes, covered = _shape_design(tuple(ranges.items()), budget, cap, tuple(moduli))
    return [dict(s) for s in shapes], covered


@functools.lru_cache(maxsize=256)
def _shape_design(
    items: tuple[tuple[str, tuple[int, int]], ...], budget: int, cap: int, moduli: tuple[int, ...]
) -> tuple[tuple[Sizes, ...], ShapeCoverage]:
    ranges = dict(items)
    shapes, covered = _designed(ranges, budget=budget, cap=cap, moduli=moduli)
    return tuple(shapes), covered


def _designed(ranges: Ranges, *, budget: int, cap: int, moduli: Sequence[int]) -> tuple[list[Sizes], ShapeCoverage]:
    names = list(ranges)
    values = {n: dim_values(lo, hi, cap) for n, (lo, hi) in ranges.items()}
    full = all(len(values[n]) == hi - lo + 1 for n, (lo, hi) in ranges.items())
    sizes = sorted((len(v) for v in values.values()), reverse=True)
    affordable = full and (sizes[0] * (sizes[1] if len(sizes) > 1 else 1) <= budget if sizes else True)
    if affordable:
        shapes = _unique([*edge_sizes(ranges), *covering_array(values)])
        if len(shapes) <= budget or len(names) < 2:
            covered = shape_coverage(shapes, ranges, method="all-pairs", moduli=moduli)
            if covered.residues_covered == covered.residues_total:
                return shapes, covered
            # Every pair of values leaves out residues of the product of three dims or more: add the shapes that
            # reach them.
            shapes = _unique([*shapes, *residue_design(ranges, moduli=moduli)])
            return shapes, shape_coverage(shapes, ranges, method="all-pairs+residues", moduli=moduli)
    shapes = residue_design(ranges, moduli=moduli)
    return shapes, shape_coverage(shapes, ranges, method="residues", moduli=moduli)
