"""Reading an entry's evidence into the flat rows that listings and summaries show.

Tezzeret writes ``performance["tezzeret"]`` (its own quick measurement right after compiling) and
``parity["representative"]``; certification writes ``performance["certify"]`` (each representative shape's
interleaved comparison with eager: both sides' p50/p95, the paired ratio and its interval) and
``parity["certify"]`` (the planned and drawn cases judged against float64: coverage, both RMSEs, their
ratio). Certification's figures win where both exist.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from esper.urza.schema import Entry


def latency_table(entry: Entry) -> dict[str, dict[str, dict[str, float]]]:
    """``{label: {"compiled": {"p50_ms", "p95_ms"}, "eager": {...}}}`` from the best available source, in the
    blueprint's representative order (JSON columns come back with sorted keys)."""
    table = entry.performance.get("certify") or entry.performance.get("tezzeret") or {}
    order = [",".join(f"{k}={v}" for k, v in r.items()) or "static" for r in entry.meta.get("representative", [])]
    return {label: table[label] for label in sorted(table, key=lambda k: order.index(k) if k in order else len(order))}


def geomean(values: Iterable[float]) -> float:
    """The geometric mean of positive ``values``: how ratios and latencies over several shapes are combined
    everywhere in Esper (selection, speedups, the summary), so that one shape cannot dominate.

    Raises ``ValueError`` on no values or a non-positive one: a 0 ms latency is a measuring bug, not a speedup.
    """
    values = list(values)
    if not values or min(values) <= 0:
        raise ValueError(f"geometric mean needs positive values, got {values}")
    return math.exp(sum(map(math.log, values)) / len(values))


def speedups(table: dict[str, dict[str, dict[str, float]]]) -> list[float]:
    """Eager p50 / route p50 per shape of a latency table, where both were measured (``compiled`` is the
    route's column)."""
    return [
        t["eager"]["p50_ms"] / t["compiled"]["p50_ms"]
        for t in table.values()
        if t.get("compiled", {}).get("p50_ms", 0) > 0 and t.get("eager", {}).get("p50_ms", 0) > 0
    ]


def speedup(entry: Entry) -> float | None:
    """Geometric mean of eager p50 / compiled p50 over the representative shapes."""
    ratios = speedups(latency_table(entry))
    return geomean(ratios) if ratios else None


def parity_error(entry: Entry) -> tuple[float | None, int | None]:
    """Max absolute compiled-vs-eager error and the number of cases it covers."""
    cert = entry.parity.get("certify")
    if cert:
        return cert.get("max_abs"), cert.get("cases")
    rep = entry.parity.get("representative") or {}
    if not rep:
        return None, None
    return max(v["max_abs"] for v in rep.values()), len(rep)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def summarize(entry: Entry) -> dict[str, Any]:
    """One flat row per entry: identity, status and headline evidence."""
    table = latency_table(entry)
    err, cases = parity_error(entry)
    reason = (entry.failure_reason or "").strip().splitlines()
    return {
        "id": entry.id,
        "blueprint": entry.blueprint,
        "v": entry.blueprint_version,
        "profile": entry.profile,
        "variant": entry.variant,
        "kind": entry.kind,
        "status": entry.status,
        "compat": f"{entry.compat.isa}/{entry.compat.device_type}",
        "compile_s": entry.meta.get("compile_seconds"),
        "parity_max_abs": _r(err),
        "cases": cases,
        "p50_ms": {k: _r(v.get("compiled", {}).get("p50_ms")) for k, v in table.items()},
        "p95_ms": {k: _r(v.get("compiled", {}).get("p95_ms")) for k, v in table.items()},
        "eager_p50_ms": {k: _r(v.get("eager", {}).get("p50_ms")) for k, v in table.items()},
        "speedup": _r(speedup(entry), 3),
        "failed_check": entry.failed_check,
        "reason": reason[0][:120] if reason else None,
        "updated": entry.updated_at,
    }
