"""What a profile gains where each cell of its range is served by the candidate that wins it there, against each
candidate alone, and what certification routed.

    .venv/bin/python -m benchmarks.variant_split [--urza PATH] [--json PATH]

For every blueprint, artifact and profile with two or more candidates that carry a route table (routed or
not; the candidates and routes ``esper report`` shows for this machine), from ``--urza`` (default
``.esper/bench/urza.db``, which ``pytest benchmarks`` fills):

- each candidate's *routed geomean* over its grid: its paired ratio to eager where its table serves compiled
  code, 1 where it serves eager;
- the *per-cell best*: every grid point served by the fastest candidate whose table compiles it there, eager
  where none does. Where the candidates' grids differ (a grid cut short by its budget), it runs over the union
  of their points, each point judged by the tables that measured it;
- the *routed per cell*: over the same points, what the routes serve: where certification shared the profile's
  cells between candidates, each point's ratio from the routed candidate whose cell it is, 1 where none is.

A candidate's own table is the one it won on its own (``own_route_table`` where it shares the profile's cells,
else its ``route_table``).

It reads the entries' recorded comparisons and measures nothing: the per-cell best is what those same
measurements would route, not a new figure. Prints a markdown table (and writes JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from esper.artifacts.compat import current
from esper.blueprint import Blueprint
from esper.report import BlueprintEvidence, collect
from esper.urza import Entry, Urza
from esper.urza.evidence import COMPILED, RouteTable, geomean, own_route_table, route_table

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Candidate:
    variant: str
    routed: bool  # what Kasmina loads for this profile
    compiled_cells: int
    cells: int
    routed_geomean: float


@dataclass(frozen=True)
class Split:
    blueprint: str
    artifact: str
    profile: str
    candidates: tuple[Candidate, ...]
    best_per_cell: float
    cells_by_variant: Mapping[str, int]  # how many cells the per-cell best gives each variant (and "eager")
    routed_per_cell: float | None = None  # what the routes serve over the same points (None: nothing routed)

    @property
    def routed(self) -> Candidate | None:
        return next((c for c in self.candidates if c.routed), None)

    @property
    def routed_variants(self) -> list[str]:
        return [c.variant for c in self.candidates if c.routed]


def _ratio_compiled(table: RouteTable) -> dict[str, float]:
    """The table's compiled cells by label, with their measured ratio to eager."""
    return {c.label: c.ratio for c in table.cells if c.path == COMPILED and c.ratio is not None}


def routed_geomean(table: RouteTable) -> float:
    """The geomean over the table's cells of what it serves: its ratio where compiled, eager's 1 elsewhere."""
    compiled = _ratio_compiled(table)
    return geomean(compiled.get(c.label, 1.0) for c in table.cells)


def best_per_cell(tables: Mapping[str, RouteTable]) -> tuple[float, dict[str, int]]:
    """Over the union of the tables' cells: the geomean of the fastest compiled ratio at each cell (1 where no
    table compiles it), and how many cells each variant (or ``"eager"``) would serve."""
    labels = list(dict.fromkeys(c.label for t in tables.values() for c in t.cells))
    compiled = {v: _ratio_compiled(t) for v, t in tables.items()}
    served: dict[str, int] = {}
    ratios = []
    for label in labels:
        offers = [(r[label], v) for v, r in compiled.items() if label in r]
        ratio, who = min(offers) if offers else (1.0, "eager")
        ratios.append(ratio)
        served[who] = served.get(who, 0) + 1
    return geomean(ratios), served


def routed_per_cell(tables: Mapping[str, RouteTable], served: Mapping[str, RouteTable]) -> float:
    """Over the points of :func:`best_per_cell` (the union of ``tables``' cells, each candidate's own table), the
    geomean of what ``served`` (the routed candidates' stored tables) serves: at each point, the ratio measured by
    the candidate whose stored table compiles it (its own cell's there), 1 where none does."""
    labels = list(dict.fromkeys(c.label for t in tables.values() for c in t.cells))
    ratios = []
    for label in labels:
        sizes = Blueprint.label_sizes(label)
        ratio = next(
            (
                r
                for v, t in served.items()
                if t.cell_of(sizes).path == COMPILED and (r := tables[v].cell_of(sizes).ratio) is not None
            ),
            1.0,
        )
        ratios.append(ratio)
    return geomean(ratios)


def splits(evidence: Iterable[BlueprintEvidence]) -> list[Split]:
    """One :class:`Split` per profile with two or more candidates carrying a route table, from the report's own
    reading of an Urza (:func:`esper.report.collect`): its candidates (the newest of each variant at the routed
    blueprint version) and its routes (what Kasmina would load on this machine)."""
    out = []
    for bp in evidence:
        for kind in bp.kinds:
            routed = {r.id for r in kind.routes}
            by_profile: dict[str, list[tuple[Entry, RouteTable]]] = {}
            for e in kind.candidates:
                table = own_route_table(e.meta)
                if table is not None:
                    by_profile.setdefault(e.profile, []).append((e, table))
            for profile, members in sorted(by_profile.items()):
                if len(members) < 2:
                    continue
                own = {e.variant: t for e, t in members}
                best, cells = best_per_cell(own)
                stored = {e.variant: route_table(e.meta) for e, _ in members if e.id in routed}
                served = {v: t for v, t in stored.items() if t is not None}
                candidates = tuple(
                    Candidate(e.variant, e.id in routed, t.compiled_cells(), len(t.cells), routed_geomean(t))
                    for e, t in members
                )
                routed_ratio = routed_per_cell(own, served) if served else None
                out.append(Split(bp.name, kind.kind.value, profile, candidates, best, cells, routed_ratio))
    return out


def markdown(rows: list[Split]) -> str:
    lines = [
        "| blueprint | artifact | profile | each candidate alone (geomean over its grid) | routed | routed per cell "
        "| per-cell best | cells by variant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        alone = "; ".join(f"{c.variant} {c.routed_geomean:.3f} ({c.compiled_cells} of {c.cells})" for c in s.candidates)
        routed = " + ".join(s.routed_variants) or "none"
        per_cell = f"{s.routed_per_cell:.3f}" if s.routed_per_cell is not None else "-"
        served = ", ".join(f"{v} {n}" for v, n in sorted(s.cells_by_variant.items()))
        lines.append(
            f"| {s.blueprint} | {s.artifact} | {s.profile} | {alone} | {routed} | {per_cell} "
            f"| {s.best_per_cell:.3f} | {served} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variant_split", description=__doc__.split("\n")[0])
    parser.add_argument("--urza", type=Path, default=ROOT / ".esper" / "bench" / "urza.db")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    if not a.urza.exists():
        print(f"no Urza at {a.urza}: run `pytest benchmarks` (or pass --urza)", file=sys.stderr)
        return 2
    with Urza(a.urza, readonly=True) as urza:
        rows = splits(collect(urza, current()))
    print(markdown(rows), end="")
    if a.json is not None:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
