"""A certified entry's route by region (:class:`~esper.urza.evidence.RouteTable`) as a per-call lookup.

Certification stores, with an entry it certified, the cells of the profile's shape space where the compiled code
beat eager with confidence. Kasmina serves the compiled code only in those cells and eager elsewhere, by
evidence: no WARNING, ``last_path == "eager"``. The lookup runs on every call its route's guards accept, so it
is generated once at load as straight-line code: read each dim's size from the arguments where the guards read
it (the dim's first occurrence in the guard schema), place it among the integer cut points with ``bisect``, and
index a tuple of booleans. An entry without a table (rows certified before tables existed) has no lookup:
compiled everywhere in its profile.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

from esper.artifacts.guards import GuardSchema
from esper.urza import Entry
from esper.urza.evidence import COMPILED, RouteTable, route_table

__all__ = ["Lookup", "lookup", "region_lookup"]

# Whether the compiled code serves a call, from the call's arguments (the guards accepted them).
Lookup = Callable[[Sequence[Any]], bool]


def _int(value: int) -> str:
    if type(value) is not int or value < 0:
        raise ValueError(f"the region lookup generator refused {value!r}")
    return str(value)


def lookup(table: RouteTable, schema: GuardSchema) -> Lookup | None:
    """The generated lookup for ``table`` under the guards ``schema``; ``None`` when the table names a dim the
    guards do not have (it is then ignored: compiled everywhere, as without a table)."""
    where: dict[str, tuple[int, int]] = {}
    for n, inp in enumerate(schema.inputs):
        for k, d in enumerate(inp.dims):
            if d.dynamic and d.name is not None:
                where.setdefault(d.name, (n, k))
    if any(d not in where for d in table.dims):
        return None
    cuts = table.cuts()
    terms = []
    stride = 1
    for i in reversed(range(len(table.dims))):
        n, k = where[table.dims[i]]
        size = f"args[{_int(n)}].shape[{_int(k)}]"
        term = f"bisect(c{_int(i)}, {size})" if cuts[i] else "0"
        terms.append(term if stride == 1 else f"{term} * {_int(stride)}")
        stride *= len(table.values[i])
    source = f"def compiled_at(args):\n    return cells[{' + '.join(reversed(terms))}]\n"
    namespace: dict[str, Any] = {
        "bisect": bisect.bisect_right,
        "cells": tuple(c.path == COMPILED for c in table.cells),
        **{f"c{i}": tuple(cs) for i, cs in enumerate(cuts)},
    }
    exec(compile(source, "<region lookup>", "exec"), namespace)
    return namespace["compiled_at"]  # type: ignore[no-any-return]


def region_lookup(entry: Entry) -> tuple[RouteTable | None, Lookup | None]:
    """``entry``'s route table and its lookup (``None, None``: no table, or none usable with its guards)."""
    table = route_table(entry.meta)
    if table is None or entry.guards is None:
        return None, None
    found = lookup(table, entry.guards)
    return (table, found) if found is not None else (None, None)
