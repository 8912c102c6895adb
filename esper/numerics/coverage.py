"""Which sizes and value cases of a shape profile must be tried: the edges every check includes, every size
of each dim, pairwise coverage of the dims, and the value regimes each shape meets.

Pure functions of the dim ranges (no hypothesis, no torch), shared by Tezzeret's compile-time checks and
certification. :mod:`esper.numerics.inputs` turns a :class:`ValueCase` into tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


# Unit, tiny and large magnitudes, exact zeros (some, all), and magnitudes mixed inside one tensor.
VALUE_REGIMES = ("unit", "tiny", "large", "some-zeros", "all-zeros", "mixed")


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
