"""A certified entry's route by region (:class:`~esper.urza.evidence.RouteTable`) as a per-call lookup.

Certification stores, with an entry it certified, the cells of the profile's shape space where the compiled code
beat eager with confidence. Kasmina serves the compiled code only in those cells and eager elsewhere, by
evidence: no WARNING, ``last_path == "eager"``. The lookup runs on every call its route's guards accept, so it
is generated once at load as straight-line code: read each dim's size from the arguments where the guards read
it (the dim's first occurrence in the guard schema), find its cell along each dim from the integer cut points, and
index a tuple of booleans. An entry without a table (rows certified before tables existed) has no lookup:
compiled everywhere in its profile. Where certification shared a profile's cells between candidates, each
certified entry's table is compiled in the cells routed to it, and a call goes to the entry whose cell it is.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

from esper.artifacts.guards import GuardSchema, Regions
from esper.urza import Entry
from esper.urza.evidence import COMPILED, RouteTable, own_route_table, route_table

__all__ = ["Lookup", "lookup", "region_lookup", "regions_of"]

# Whether the compiled code serves a call, from the call's arguments (the guards accepted them).
Lookup = Callable[[Sequence[Any]], bool]


# Ranges up to this size index a tuple by the size itself; wider ones bisect the cut points.
DIRECT_SIZES = 1 << 14


def _int(value: int) -> str:
    if type(value) is not int or value < 0:
        raise ValueError(f"the region lookup generator refused {value!r}")
    return str(value)


def lookup(table: RouteTable, schema: GuardSchema) -> Lookup | None:
    """The generated lookup for ``table`` under the guards ``schema``; ``None`` when the table names a dim the
    guards do not have (it is then ignored: compiled everywhere, as without a table).

    Each dim's offset into the cells is a tuple indexed by the size itself (the guards bound it to the dim's
    range; ranges wider than :data:`DIRECT_SIZES` place the size with ``bisect`` instead), and each input's
    shape is read once: a call pays a shape read, a tuple index per dim and one more for the cell."""
    where: dict[str, tuple[int, int]] = {}
    for n, inp in enumerate(schema.inputs):
        for k, d in enumerate(inp.dims):
            if d.dynamic and d.name is not None:
                where.setdefault(d.name, (n, k))
    if any(d not in where for d in table.dims):
        return None
    ranges = schema.dim_ranges()
    compiled = tuple(c.path == COMPILED for c in table.cells)
    cuts = table.cuts()
    namespace: dict[str, Any] = {"bisect": bisect.bisect_right, "cells": compiled}
    terms = []
    stride = 1
    for i in reversed(range(len(table.dims))):
        dim = table.dims[i]
        n, k = where[dim]
        size = f"s{_int(n)}[{_int(k)}]"
        high = ranges[dim][1]
        if high <= DIRECT_SIZES:
            offsets = tuple(bisect.bisect_right(cuts[i], v) * stride for v in range(high + 1))
            if len(table.dims) == 1:
                namespace[f"r{i}"] = tuple(compiled[o] for o in offsets)  # straight to the answer
            else:
                namespace[f"r{i}"] = offsets
            terms.append(f"r{_int(i)}[{size}]")
        else:
            namespace[f"c{i}"] = cuts[i]
            terms.append(f"bisect(c{_int(i)}, {size})" + (f" * {_int(stride)}" if stride != 1 else ""))
        stride *= len(table.values[i])
    inputs = sorted({n for n, _ in where.values()})
    lines = ["def compiled_at(args):", *(f"    s{_int(n)} = args[{_int(n)}].shape" for n in inputs)]
    direct = len(table.dims) == 1 and ranges[table.dims[0]][1] <= DIRECT_SIZES
    lines.append(f"    return {terms[0]}" if direct else f"    return cells[{' + '.join(reversed(terms))}]")
    exec(compile("\n".join(lines) + "\n", "<region lookup>", "exec"), namespace)
    return namespace["compiled_at"]


def region_lookup(entry: Entry, *, own: bool = False) -> tuple[RouteTable | None, Lookup | None]:
    """``entry``'s route table and its lookup (``None, None``: no table, or none usable with its guards).
    ``own``: where the entry shares its profile's cells with other entries, the table of the cells it won on its
    own (:func:`~esper.urza.evidence.own_route_table`) rather than of those routed to it."""
    table = own_route_table(entry.meta) if own else route_table(entry.meta)
    if table is None or entry.guards is None:
        return None, None
    found = lookup(table, entry.guards)
    return (table, found) if found is not None else (None, None)


def regions_of(table: RouteTable, schema: GuardSchema) -> Regions | None:
    """``table`` as the :class:`~esper.artifacts.guards.Regions` a generated dispatcher folds into its guard
    (:func:`esper.artifacts.guards.compile_dispatch`); ``None`` when the table names a dim the guards do not
    have (it is then ignored, as by :func:`lookup`)."""
    dynamic = {d.name for i in schema.inputs for d in i.dims if d.dynamic}
    if any(d not in dynamic for d in table.dims):
        return None
    return Regions(tuple(table.dims), table.cuts(), tuple(c.path == COMPILED for c in table.cells))
