"""P2's points measured again in several fresh processes: how far one shape's Kasmina / bare module ratio moves
from one process to the next, and whether a routed path is slower than the bare module in some of them.

    .venv/bin/python -m benchmarks.processes [--processes N] [any option of benchmarks.grid]

One P2 run (:mod:`benchmarks.grid`) measures every point in one process, interleaved, with an interval that
holds for that process. A multi-threaded call's time also depends on the process: whether its OpenMP workers
spin or sleep between parallel regions, and, on a virtual machine, whether the host runs their vCPU meanwhile.
On a 2-core VM an eager depthwise convolution at a small shape ran nearly twice as fast in some fresh processes
as in others, steady within each (docs/performance.md): a route certified in one process can be slower than the
bare module in the next. This runs ``python -m benchmarks.grid`` ``--processes`` times, one after another (never two at
once), with this command's other options (``--urza``, ``-k``, ``--kind``, ``--rounds``...), and reports per
point the ratio in each process and in how many it was slower than the bare module by more than
:data:`benchmarks.grid.SLOWER_BY` with confidence.

``--openmp-team`` measures each process beside a parked OpenMP team (:func:`benchmarks.grid.park_openmp_team`),
the state of a process whose other threads have used torch. Writes ``--json`` (default
``.esper/bench/processes.json``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import grid

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 3


@dataclass(frozen=True)
class PointSpread:
    """One point over the processes: its ratio (Kasmina / bare module) and path in each, and in how many it was
    slower than the bare module with confidence."""

    blueprint: str
    kind: str
    label: str
    ratios: tuple[float, ...]
    paths: tuple[str, ...]
    slower_in: int

    @property
    def processes(self) -> int:
        return len(self.ratios)

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """The largest ratio over the smallest: how much the process alone moved this point."""
        return max(self.ratios) / min(self.ratios)


@dataclass(frozen=True)
class Spread:
    """Every point over the processes, and P2 (representative, grid) in each process."""

    points: tuple[PointSpread, ...]
    p2_representative: tuple[float | None, ...]
    p2_grid: tuple[float | None, ...]

    @property
    def slower_somewhere(self) -> tuple[PointSpread, ...]:
        return tuple(p for p in self.points if p.slower_in)


def spread(runs: Sequence[Sequence[Mapping[str, Any]]]) -> Spread:
    """``runs``: per process, its points as :mod:`benchmarks.grid` writes them (``points`` of its JSON). Points
    are matched by blueprint, kind and shape; one missing from some process is reported over those it ran in."""
    by_point: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        for m in run:
            by_point.setdefault((m["blueprint"], m["kind"], m["label"]), []).append(m)
    points = tuple(
        PointSpread(
            blueprint,
            kind,
            label,
            tuple(float(m["ratio"]) for m in ms),
            tuple(str(m.get("path", "")) for m in ms),
            sum(1 for m in ms if grid.slower_with_confidence(float(m["low"]), float(m.get("coverage", 0.0)))),
        )
        for (blueprint, kind, label), ms in by_point.items()
    )
    return Spread(
        points,
        tuple(grid.p2(float(m["ratio"]) for m in run if m["kind"] == grid.REPRESENTATIVE) for run in runs),
        tuple(grid.p2(float(m["ratio"]) for m in run if m["kind"] == grid.GRID) for run in runs),
    )


def markdown(s: Spread, *, openmp_team: bool = False) -> list[str]:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    beside = " beside a parked OpenMP team" if openmp_team else ""
    lines = [
        f"## Kasmina / bare module in {len(s.p2_representative)} fresh processes{beside}",
        "",
        f"P2 at the representative shapes per process: {', '.join(fmt(v) for v in s.p2_representative)}; over the "
        f"grid: {', '.join(fmt(v) for v in s.p2_grid)}. Points slower than the bare module by more than "
        f"{grid.SLOWER_BY:.0%} with confidence in at least one process: {len(s.slower_somewhere)} of {len(s.points)}.",
        "",
        "| blueprint | kind | shape | paths | ratio per process | max / min | slower in |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in s.points:
        lines.append(
            f"| {p.blueprint} | {p.kind} | {p.label} | {'/'.join(sorted(set(p.paths)))} "
            f"| {', '.join(f'{r:.2f}' for r in p.ratios)} | {p.spread:.2f} | {p.slower_in} of {p.processes} |"
        )
    return lines


def grid_command(opts: argparse.Namespace, out: Path) -> list[str]:
    """The child process's command line: :mod:`benchmarks.grid` with this run's options."""
    cmd = [sys.executable, "-m", "benchmarks.grid", "--urza", str(opts.urza), "--rounds", str(opts.rounds)]
    cmd += ["--calls", str(opts.calls)]
    for folder in opts.blueprints or []:
        cmd += ["--blueprints", str(folder)]
    for name in opts.k:
        cmd += ["-k", name]
    for kind in opts.kind or []:
        cmd += ["--kind", kind]
    if opts.openmp_team:
        cmd.append("--openmp-team")
    return [*cmd, "--json", str(out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.processes",
        description=__doc__.split("\n\n")[0],
        parents=[grid.arguments(add_help=False)],
    )
    parser.add_argument("--processes", type=int, default=PROCESSES, help="fresh processes, one after another")
    parser.set_defaults(json=ROOT / ".esper" / "bench" / "processes.json")
    opts = parser.parse_args(argv)
    if opts.processes < 2:
        parser.error("--processes must be at least 2: one process is what benchmarks.grid measures")
    if not opts.urza.is_file():
        parser.error(f"no Urza at {opts.urza} (certify first, or pass --urza)")
    runs: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="processes-") as tmp:
        for i in range(opts.processes):
            out = Path(tmp) / f"{i}.json"
            done = subprocess.run(grid_command(opts, out), cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
            if done.returncode != 0 or not out.is_file():
                print(f"process {i + 1} of {opts.processes} failed (exit {done.returncode})", file=sys.stderr)
                return 1
            runs.append(json.loads(out.read_text())["points"])
            print(f"process {i + 1} of {opts.processes}: {len(runs[-1])} points", file=sys.stderr)
    result = spread(runs)
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(
        json.dumps(
            {
                "openmp_team": opts.openmp_team,
                "p2_representative": result.p2_representative,
                "p2_grid": result.p2_grid,
                "points": [{**asdict(p), "median": p.median, "spread": p.spread} for p in result.points],
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(markdown(result, openmp_team=opts.openmp_team)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
