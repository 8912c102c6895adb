"""Routing by region: where in a profile's shape space a candidate beats eager, as pure functions.

Certification measures each candidate against eager not only at the blueprint's representative shapes but over
a small grid across the profile's ranges (:func:`grid`): along each dynamic dim, log-spaced sizes from the
range's minimum to its maximum, with the representative sizes among them; for several dims the product of
those sizes, thinned to :data:`GRID_BUDGET` points by dropping the costliest (the largest shapes: a call's
cost grows with its size), never a representative shape. Where two neighbouring points decided differently,
:func:`refine` adds their geometric midpoint (at most :data:`REFINE_POINTS` points more).

:func:`route_table` turns the measured points into a :class:`~esper.urza.evidence.RouteTable`: the cut points
along each dim are the geometric midpoints of adjacent grid sizes, and each cell serves compiled code exactly
where its grid point *wins* by the margin with confidence; a cell whose point loses, is even or inconclusive,
or was not measured (beyond the grid's budget) runs eager, and says why.

Where several candidates of one profile win somewhere, :func:`share` gives each cell to one of them: on the
grid of every size any of them measured, a cell goes to a candidate whose own table is compiled all over it, the
first in preference order unless a later one is faster there by the margin with confidence; each candidate's
table then serves compiled code in its own cells only, and a cell no candidate wins runs eager.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from esper.certification import timing
from esper.urza.evidence import COMPILED, EAGER, RegionCell, RouteTable, threshold

__all__ = [
    "GRID_BUDGET",
    "GRID_PER_DIM",
    "REFINE_POINTS",
    "Grid",
    "dim_values",
    "grid",
    "label",
    "refine",
    "route_table",
    "share",
]

# Sizes along one dim at most (a profile with one dynamic dim), and points of one profile's grid at most before
# refinement (several dims: the product, thinned): a grid point at a small size costs a few milliseconds to
# compare, one at the largest sizes of a convolution's training step about a second.
GRID_PER_DIM = 8
GRID_BUDGET = 24
# Points refinement may add where adjacent grid points decided differently.
REFINE_POINTS = 4
NOT_MEASURED = "not measured (beyond the grid's budget)"

Sizes = Mapping[str, int]


def label(sizes: Sizes) -> str:
    """A grid point's full shape as a label, ``"batch=2,seq=16"`` (the representative shapes' form)."""
    return ",".join(f"{k}={v}" for k, v in sizes.items()) or "static"


def dim_values(low: int, high: int, count: int, include: Iterable[int] = ()) -> tuple[int, ...]:
    """``count`` log-spaced sizes across ``[low, high]``, both ends included, rounded to integers (fewer where
    rounding merges them), and every size of ``include`` inside the range."""
    if low > high or low < 1:
        raise ValueError(f"not a size range: [{low}, {high}]")
    if low == high or count < 2:
        spaced = {low, high}
    else:
        step = math.log(high / low) / (count - 1)
        spaced = {min(high, max(low, round(low * math.exp(step * i)))) for i in range(count)}
    return tuple(sorted(spaced | {v for v in include if low <= v <= high}))


@dataclass(frozen=True)
class Grid:
    """A profile's grid: its dynamic ``dims``, the sizes along each (``values``, ascending), and the points of
    their product that are measured (``points``, each a full shape in ``dims`` order)."""

    dims: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    points: tuple[Sizes, ...]

    def product(self) -> list[dict[str, int]]:
        """Every point of the product of ``values``, row-major (the last dim varies fastest): one per cell."""
        return [dict(zip(self.dims, combo, strict=True)) for combo in itertools.product(*self.values)]


def _cost(sizes: Sizes) -> int:
    return math.prod(sizes.values())


def grid(
    ranges: Mapping[str, tuple[int, int]],
    representative: Sequence[Sizes] = (),
    *,
    budget: int = GRID_BUDGET,
    per_dim: int = GRID_PER_DIM,
) -> Grid:
    """The grid of a profile with dim ``ranges`` (see the module docstring). ``representative``: the blueprint's
    representative shapes inside the profile; each is a grid point, whatever the budget."""
    dims = tuple(ranges)
    if not dims:
        return Grid((), (), ())
    count = max(2, min(per_dim, math.floor(budget ** (1 / len(dims)) + 1e-9)))
    values = tuple(
        _fill(lo, hi, count, [int(r[d]) for r in representative if d in r]) for d, (lo, hi) in ranges.items()
    )
    keep = [{d: int(r[d]) for d in dims} for r in representative if all(d in r for d in dims)]
    others = [p for p in Grid(dims, values, ()).product() if p not in keep]
    others.sort(key=_cost)  # stable: among equal costs, row-major order
    chosen = keep + others[: max(0, budget - len(keep))]
    order = {label(p): i for i, p in enumerate(Grid(dims, values, ()).product())}
    chosen.sort(key=lambda p: order[label(p)])
    return Grid(dims, values, tuple(chosen))


def _fill(low: int, high: int, count: int, include: Sequence[int]) -> tuple[int, ...]:
    """At most ``count`` sizes (more only where the ends and ``include`` alone are more): the most log-spaced
    sizes that fit beside them."""
    for spaced in range(count, 1, -1):
        values = dim_values(low, high, spaced, include)
        if len(values) <= count:
            return values
    return dim_values(low, high, 2, include)


def refine(g: Grid, decisions: Mapping[str, str], *, points: int = REFINE_POINTS) -> Grid:
    """``g`` with the geometric midpoint of two adjacent sizes added along a dim where neighbouring measured
    points route differently (one wins, the other does not), as long as at most ``points`` new points need
    measuring: the new size's points beside a measured one (the others stay unmeasured, as their neighbours
    were). ``decisions``: each measured point's decision, by :func:`label`. Flips at the smallest sizes come
    first; the returned grid's new points are those in ``points`` not in ``g.points``."""
    measured = {label(p) for p in g.points}
    values = [list(vs) for vs in g.values]
    added: list[dict[str, int]] = []
    for d in range(len(g.dims)):
        for a, b in itertools.pairwise(g.values[d]):
            mid = round(math.sqrt(a * b))
            if not a < mid < b:
                continue
            slab: list[dict[str, int]] = []
            flips = False
            for rest in itertools.product(*(vs for k, vs in enumerate(g.values) if k != d)):
                lo = _with(g.dims, d, a, rest)
                hi = _with(g.dims, d, b, rest)
                here = [label(p) for p in (lo, hi) if label(p) in measured]
                if not here:
                    continue
                slab.append(_with(g.dims, d, mid, rest))
                won = [decisions.get(x) == timing.WINS for x in here]
                flips = flips or (len(here) == 2 and won[0] != won[1])
            if flips and len(added) + len(slab) <= points:
                values[d].append(mid)
                added += slab
    if not added:
        return g
    new_values = tuple(tuple(sorted(vs)) for vs in values)
    order = {label(p): i for i, p in enumerate(Grid(g.dims, new_values, ()).product())}
    # A midpoint added along one dim and another along a second dim make cells neither slab measured: eager.
    chosen = sorted([*map(dict, g.points), *added], key=lambda p: order[label(p)])
    return replace(g, values=new_values, points=tuple(chosen))


def _with(dims: tuple[str, ...], d: int, value: int, rest: tuple[int, ...]) -> dict[str, int]:
    combo = list(rest)
    combo.insert(d, value)
    return dict(zip(dims, combo, strict=True))


def route_table(g: Grid, comparisons: Mapping[str, timing.Comparison], *, margin: float) -> RouteTable:
    """The route table of grid ``g`` from the comparisons measured at its points (by :func:`label`): compiled
    exactly in the cells whose point wins by the margin with confidence; eager elsewhere, with the reason."""
    cells = []
    for sizes in g.product():
        cmp = comparisons.get(label(sizes))
        if cmp is None:
            cells.append(RegionCell(sizes, EAGER, why=NOT_MEASURED))
            continue
        cells.append(
            RegionCell(
                sizes,
                COMPILED if cmp.decision == timing.WINS else EAGER,
                cmp.decision,
                cmp.ratio,
                cmp.low,
                cmp.high,
                cmp.rounds,
                cmp.reason(),
            )
        )
    return RouteTable(g.dims, g.values, tuple(cells), margin)


# Past every size a guard accepts: the upper edge of a dim's last cell.
_UNBOUNDED = 1 << 62


def _spans(values: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per grid size, the sizes its cell holds along the dim: from the cut below it to the one above, less one."""
    cuts = [threshold(a, b) for a, b in itertools.pairwise(values)]
    return list(zip([0, *cuts], [c - 1 for c in cuts] + [_UNBOUNDED], strict=True))


def _covers(table: RouteTable, box: Sequence[tuple[int, int]]) -> list[RegionCell]:
    """The cells of ``table`` that the box of sizes ``box`` (one inclusive span per dim) overlaps."""
    ranges = [
        range(bisect.bisect_right(cuts, lo), bisect.bisect_right(cuts, hi) + 1)
        for cuts, (lo, hi) in zip(table.cuts(), box, strict=True)
    ]
    strides = [math.prod(len(vs) for vs in table.values[d + 1 :]) for d in range(len(table.dims))]
    return [
        table.cells[sum(i * s for i, s in zip(combo, strides, strict=True))] for combo in itertools.product(*ranges)
    ]


def share(
    tables: Mapping[str, RouteTable],
    comparisons: Mapping[str, Mapping[str, timing.Comparison]],
    faster: Callable[[timing.Comparison, timing.Comparison], bool],
) -> dict[str, RouteTable]:
    """Each cell of a profile given to one candidate (see the module docstring): per candidate that gets a cell,
    its table over the grid of every size measured (the union of ``tables``' sizes per dim), compiled exactly in
    the cells it serves. ``tables``: each candidate's own table, in preference order, over the profile's dims;
    ``comparisons``: each candidate's comparisons by grid point label (those its cells carry); ``faster(a, b)``:
    whether comparison ``a`` beats ``b`` by the margin with confidence. Where one candidate serves every cell
    that is served, it keeps its own table; no candidate winning anywhere gives ``{}``.

    A candidate serves a cell only where every cell of its own table the cell overlaps is compiled: grids refined
    differently place their cuts differently, and no part of a served cell lies where the candidate did not win.
    Its comparison there is the one at its own grid point whose cell holds the cell's point."""
    winning = [cid for cid, t in tables.items() if t.compiled_anywhere]
    if len(winning) <= 1:
        return {cid: tables[cid] for cid in winning}
    first = tables[winning[0]]
    if any(tables[cid].dims != first.dims for cid in winning):
        raise ValueError("candidates of one profile share its dims")
    values = tuple(tuple(sorted({v for cid in winning for v in tables[cid].values[d]})) for d in range(len(first.dims)))
    spans = [_spans(vs) for vs in values]
    points = [dict(zip(first.dims, combo, strict=True)) for combo in itertools.product(*values)]
    boxes = [list(combo) for combo in itertools.product(*spans)]
    served: list[str | None] = []
    for sizes, box in zip(points, boxes, strict=True):
        chosen: str | None = None
        for cid in winning:
            if not all(c.path == COMPILED for c in _covers(tables[cid], box)):
                continue
            if chosen is None or faster(
                _at(tables[cid], comparisons[cid], sizes), _at(tables[chosen], comparisons[chosen], sizes)
            ):
                chosen = cid
        served.append(chosen)
    if len({owner for owner in served if owner is not None}) <= 1:
        return {cid: tables[cid] for cid in winning if cid in served}  # one serves: its own cuts, as alone
    margin = first.margin
    out = {}
    for cid in winning:
        if cid not in served:
            continue
        cells = []
        for sizes, owner in zip(points, served, strict=True):
            own = tables[cid].cell_of(sizes)
            measured = own.label == label(sizes)
            cell = RegionCell(
                sizes,
                COMPILED if owner == cid else EAGER,
                own.decision if measured else None,
                own.ratio if measured else None,
                own.low if measured else None,
                own.high if measured else None,
                own.rounds if measured else None,
                own.why if measured else f"in the cell of {own.label}: {own.why}",
            )
            if owner is not None and owner != cid:
                cell = replace(cell, why=f"routed to {owner}; here {cell.why}", served_by=owner)
            cells.append(cell)
        out[cid] = RouteTable(first.dims, values, tuple(cells), margin)
    return out


def _at(table: RouteTable, comparisons: Mapping[str, timing.Comparison], sizes: Sizes) -> timing.Comparison:
    """The comparison at the grid point of ``table`` whose cell holds ``sizes`` (a compiled cell was measured)."""
    return comparisons[table.cell_of(sizes).label]
