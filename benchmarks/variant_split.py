"""What a profile would gain if each cell of its range were served by the candidate that wins it there, against the
one candidate certification routes the whole profile to.

    .venv/bin/python -m benchmarks.variant_split [--urza PATH] [--json PATH]

For every blueprint, artifact and profile with two or more candidates that carry a route table (certified or
not; the newest entry of each variant at the newest blueprint version), from ``--urza`` (default
``.esper/bench/urza.db``, which ``pytest benchmarks`` fills):

- each candidate's *routed geomean* over its grid: its paired ratio to eager where its table serves compiled
  code, 1 where it serves eager;
- the *per-cell best*: every grid point served by the fastest candidate whose table compiles it there, eager
  where none does. Where the candidates' grids differ (a grid cut short by its budget), it runs over the union
  of their points, each point judged by the tables that measured it.

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

from esper.urza import Urza
from esper.urza.evidence import COMPILED, RouteTable, geomean, route_table
from esper.urza.schema import Entry, EntryStatus

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Candidate:
    variant: str
    certified: bool
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

    @property
    def routed(self) -> Candidate | None:
        return next((c for c in self.candidates if c.certified), None)


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


def splits(entries: Iterable[Entry]) -> list[Split]:
    """One :class:`Split` per profile with two or more candidates carrying a route table."""
    newest: dict[tuple[str, str, str, str], Entry] = {}
    version: dict[str, int] = {}
    listed = list(entries)
    for e in listed:
        version[e.blueprint] = max(version.get(e.blueprint, e.blueprint_version), e.blueprint_version)
    for e in sorted(listed, key=lambda e: e.id or 0, reverse=True):  # newest first
        if e.blueprint_version == version[e.blueprint]:
            newest.setdefault((e.blueprint, e.artifact, e.profile, e.variant), e)
    groups: dict[tuple[str, str, str], list[tuple[Entry, RouteTable]]] = {}
    for (bp, artifact, profile, _), e in newest.items():
        table = route_table(e.meta)
        if table is not None:
            groups.setdefault((bp, artifact, profile), []).append((e, table))
    out = []
    for (bp, artifact, profile), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        tables = {e.variant: t for e, t in members}
        best, served = best_per_cell(tables)
        candidates = tuple(
            Candidate(e.variant, e.status == EntryStatus.CERTIFIED, t.compiled_cells(), len(t.cells), routed_geomean(t))
            for e, t in members
        )
        out.append(Split(bp, artifact, profile, candidates, best, served))
    return out


def markdown(rows: list[Split]) -> str:
    lines = [
        "| blueprint | artifact | profile | routed (geomean over its grid) | others | per-cell best "
        "| cells by variant |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        routed = s.routed
        chosen = (
            f"{routed.variant} {routed.routed_geomean:.3f} ({routed.compiled_cells} of {routed.cells})"
            if routed
            else "none certified"
        )
        others = "; ".join(
            f"{c.variant} {c.routed_geomean:.3f} ({c.compiled_cells} of {c.cells})"
            for c in s.candidates
            if c is not routed
        )
        served = ", ".join(f"{v} {n}" for v, n in sorted(s.cells_by_variant.items()))
        lines.append(
            f"| {s.blueprint} | {s.artifact} | {s.profile} | {chosen} | {others} | {s.best_per_cell:.3f} | {served} |"
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
        rows = splits(urza.entries())
    print(markdown(rows), end="")
    if a.json is not None:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
