"""What a profile would gain if each cell of its range were served by the candidate that wins it there, against the
one candidate certification routes the whole profile to.

    .venv/bin/python -m benchmarks.variant_split [--urza PATH] [--json PATH]

For every blueprint, artifact and profile with two or more candidates that carry a route table (routed or
not; the candidates and routes ``esper report`` shows for this machine), from ``--urza`` (default
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

from esper.artifacts.compat import current
from esper.report import BlueprintEvidence, collect
from esper.urza import Entry, Urza
from esper.urza.evidence import COMPILED, Evidence, RouteTable, geomean

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

    @property
    def routed(self) -> Candidate | None:
        return next((c for c in self.candidates if c.routed), None)


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
                table = Evidence.of(e).meta.route_table
                if table is not None:
                    by_profile.setdefault(e.profile, []).append((e, table))
            for profile, members in sorted(by_profile.items()):
                if len(members) < 2:
                    continue
                best, served = best_per_cell({e.variant: t for e, t in members})
                candidates = tuple(
                    Candidate(e.variant, e.id in routed, t.compiled_cells(), len(t.cells), routed_geomean(t))
                    for e, t in members
                )
                out.append(Split(bp.name, kind.kind.value, profile, candidates, best, served))
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
            else "none routed"
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
        rows = splits(collect(urza, current()))
    print(markdown(rows), end="")
    if a.json is not None:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
