"""P2 over the declared ranges: the Kasmina kernel against the bare module at the representative shapes and over
a grid of each profile's ranges (the shapes a user actually sends), every point measured interleaved.

    .venv/bin/python -m benchmarks.grid [--urza URZA] [--blueprints DIR] [-k NAME] [--kind KIND] [--rounds N]
        [--openmp-team] [--json OUT]

Per blueprint, the points are the representative shapes and, per shape profile, a grid of the profile's declared
ranges (:func:`range_grid`: log-spaced sizes along each dynamic dim, their product thinned to a budget by
:func:`esper.certification.regions.grid`). Each point is one :func:`esper.certification.timing.compare` of the
kernel against the bare module on the same inputs, in fixed interleaved rounds, with the 95% interval of the
median per-round ratio. The points of one blueprint are measured in an interleaved order (representative
shapes among the grid's), so that a slow minute of a shared machine does not fall on one kind of point only.

``--kind representative`` (or ``grid``) measures only that kind of point. ``--openmp-team`` first parks a thread that
has run one parallel torch op (:func:`park_openmp_team`), as a process whose other threads use torch has one.

P2 is the geometric mean over the points of kernel / bare module time (:func:`p2`), reported for the
representative shapes and for the grid; a point is *slower than the bare module* when its interval covers the
median ratio with at least :data:`CONFIDENCE` and lies wholly above ``1 + SLOWER_BY``
(:func:`slower_with_confidence`). :func:`acceptance_problems` holds the figures to the
performance targets.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from esper.blueprint import Blueprint
from esper.certification import regions
from esper.urza import evidence

REPRESENTATIVE = "representative"
GRID = "grid"
# The performance targets over the declared ranges.
P2_REPRESENTATIVE_MAX = 0.65
P2_GRID_MAX = 0.8
SLOWER_BY = 0.05
CONFIDENCE = 0.95
# Sizes along one dynamic dim, and points of one profile's grid at most (several dims: their product, thinned).
GRID_PER_DIM = 5
GRID_BUDGET = 25
# Fixed rounds, no early stop: every point rests on the same evidence. Each round times CALLS alternating pairs.
ROUNDS = 15
CALLS = 5
KINDS = (REPRESENTATIVE, GRID)


@dataclass(frozen=True)
class Point:
    """One shape to measure: the blueprint, the profile whose grid holds it (``""`` for a representative shape),
    its sizes and whether it is a representative shape or a grid point."""

    blueprint: str
    kind: str
    sizes: Mapping[str, int]
    profile: str = ""

    @property
    def label(self) -> str:
        return Blueprint.shape_label(self.sizes)


@dataclass(frozen=True)
class Measured:
    """A point's comparison: the kernel / bare module ratio (median of per-round ratios) with its interval, the
    path the kernel's last call took, and both sides' median times."""

    blueprint: str
    kind: str
    label: str
    ratio: float
    low: float
    high: float
    coverage: float = 0.0  # the interval's actual coverage (the sign test's; below CONFIDENCE with few rounds)
    path: str = ""
    kernel_ms: float = 0.0
    eager_ms: float = 0.0
    rounds: int = 0

    @property
    def slower(self) -> bool:
        return slower_with_confidence(self.low, self.coverage)


def slower_with_confidence(low: float, coverage: float, by: float = SLOWER_BY, confidence: float = CONFIDENCE) -> bool:
    """Whether a ratio whose interval starts at ``low`` is slower than the bare module by more than ``by`` with
    confidence: the interval covers the median ratio with at least ``confidence`` and lies wholly above
    ``1 + by``. Too few rounds for that confidence decide nothing."""
    return coverage >= confidence and low > 1.0 + by


def range_grid(
    bp: Blueprint, *, per_dim: int = GRID_PER_DIM, budget: int = GRID_BUDGET
) -> tuple[tuple[str, dict[str, int]], ...]:
    """Per shape profile of ``bp``, the grid of its declared ranges: ``(profile, sizes)`` pairs, profiles in
    declaration order, each profile's points row-major. A point two profiles share (their common edge) is kept
    once, under the first. A blueprint without dynamic dims has one point, its static shape."""
    if not bp.dims:
        return (("default", {}),)
    out: list[tuple[str, dict[str, int]]] = []
    seen: set[str] = set()
    for profile, ranges in bp.profiles().items():
        for sizes in regions.grid(ranges, (), budget=budget, per_dim=per_dim).points:
            if (key := Blueprint.shape_label(sizes)) not in seen:
                seen.add(key)
                out.append((profile, dict(sizes)))
    return tuple(out)


def points(
    bp: Blueprint, *, per_dim: int = GRID_PER_DIM, budget: int = GRID_BUDGET, kinds: Collection[str] = KINDS
) -> list[Point]:
    """The representative shapes and the grid points of ``bp``, interleaved: the representative shapes spread
    evenly among the grid's, each kind in its own order (a grid point that is also a representative shape is
    measured in both roles: each P2 has its full set of shapes). ``kinds``: the kinds of point to take."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kind of point {sorted(unknown)} (known: {', '.join(KINDS)})")
    reps = [Point(bp.name, REPRESENTATIVE, dict(r)) for r in bp.representative] if REPRESENTATIVE in kinds else []
    grid = (
        [Point(bp.name, GRID, sizes, profile) for profile, sizes in range_grid(bp, per_dim=per_dim, budget=budget)]
        if GRID in kinds
        else []
    )
    return interleave(reps, grid)


def interleave(few: Sequence[Point], many: Sequence[Point]) -> list[Point]:
    """``few`` spread evenly among ``many``, both in their own order: the i-th of ``few`` goes before the
    ``round((i + 0.5) * len(many) / len(few))``-th of ``many``."""
    out: list[Point] = []
    at = [round((i + 0.5) * len(many) / len(few)) for i in range(len(few))] if few else []
    k = 0
    for j in range(len(many) + 1):
        while k < len(few) and at[k] <= j:
            out.append(few[k])
            k += 1
        if j < len(many):
            out.append(many[j])
    return out


def p2(ratios: Iterable[float]) -> float | None:
    """P2: the geometric mean of the kernel / bare module ratios (``None`` when there are none)."""
    values = [float(r) for r in ratios if r > 0]
    return evidence.geomean(values) if values else None


@dataclass(frozen=True)
class Summary:
    """One suite run's P2 over the ranges: P2 at the representative shapes and over the grid, and the points
    slower than the bare module by more than ``SLOWER_BY`` with confidence (``"blueprint[label]"``)."""

    representative: float | None
    grid: float | None
    slower: tuple[str, ...]
    points: int


def summarize(measured: Sequence[Measured]) -> Summary:
    return Summary(
        representative=p2(m.ratio for m in measured if m.kind == REPRESENTATIVE),
        grid=p2(m.ratio for m in measured if m.kind == GRID),
        slower=tuple(sorted({f"{m.blueprint}[{m.label}]" for m in measured if m.slower})),
        points=len(measured),
    )


def acceptance_problems(
    s: Summary, *, representative_max: float = P2_REPRESENTATIVE_MAX, grid_max: float = P2_GRID_MAX
) -> list[str]:
    """What misses the targets: P2 at the representative shapes above ``representative_max``, over the grid
    above ``grid_max``, any point slower than the bare module with confidence, or a P2 not measured."""
    problems = []
    for name, value, limit in (("representative", s.representative, representative_max), ("grid", s.grid, grid_max)):
        if value is None:
            problems.append(f"P2 {name}: not measured")
        elif value > limit:
            problems.append(f"P2 {name} {value:.3f} > {limit}")
    if s.slower:
        problems.append(f"slower than the bare module by more than {SLOWER_BY:.0%} with confidence: {list(s.slower)}")
    return problems


# -- measuring ---------------------------------------------------------------------------------------------------


def measure_point(
    point: Point,
    kernel: Callable[..., Any],
    module: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    rounds: int = ROUNDS,
    calls: int = CALLS,
    path: Callable[[], str] = lambda: "",
) -> Measured:
    """``kernel`` against ``module`` on ``args``, in ``rounds`` interleaved rounds of ``calls`` pairs."""
    import torch

    from esper.certification.timing import compare, median_interval

    with torch.no_grad():
        c = compare(
            lambda: kernel(*args),
            lambda: module(*args),
            rounds=rounds,
            min_rounds=rounds,
            max_rounds=rounds,
            calls=calls,
            warmup=3,
            margin=SLOWER_BY,
            confidence=CONFIDENCE,
        )
        taken = path()
    low, high, coverage = median_interval(c.ratios, CONFIDENCE)
    return Measured(
        point.blueprint,
        point.kind,
        point.label,
        c.ratio,
        low,
        high,
        coverage,
        taken,
        c.candidate_p50 * 1e3,
        c.eager_p50 * 1e3,
        c.rounds,
    )


def measure_blueprint(
    bp: Blueprint,
    kernel: Any,
    *,
    rounds: int = ROUNDS,
    calls: int = CALLS,
    per_dim: int = GRID_PER_DIM,
    budget: int = GRID_BUDGET,
    kinds: Collection[str] = KINDS,
) -> list[Measured]:
    """Every point of ``bp`` (:func:`points`): the Kasmina ``kernel`` against a fresh bare module."""
    from esper.numerics.inputs import example_inputs

    module = bp.build().eval()
    out = []
    for point in points(bp, per_dim=per_dim, budget=budget, kinds=kinds):
        args = example_inputs(bp, point.sizes)
        out.append(
            measure_point(point, kernel, module, args, rounds=rounds, calls=calls, path=lambda: str(kernel.last_path))
        )
    return out


def measure_urza(
    urza: Path,
    blueprint_paths: Sequence[Path],
    names: Sequence[str] = (),
    *,
    rounds: int = ROUNDS,
    calls: int = CALLS,
    kinds: Collection[str] = KINDS,
) -> list[Measured]:
    """Every blueprint of the catalog at ``blueprint_paths`` (or those ``names``), served by Kasmina from
    ``urza``."""
    from esper.catalog import load_catalog
    from esper.kasmina import Kasmina

    catalog = load_catalog(list(blueprint_paths))
    kasmina = Kasmina(urza, catalog=catalog)
    out: list[Measured] = []
    for bp in sorted(catalog.blueprints.values(), key=lambda b: b.name):
        if not names or bp.name in names:
            out += measure_blueprint(bp, kasmina.load(bp.name), rounds=rounds, calls=calls, kinds=kinds)
    return out


def park_openmp_team() -> threading.Event:
    """Start a thread that runs one parallel torch op and then waits, until the returned event is set.

    libgomp gives every thread that opens a parallel region its own team of workers, for as long as the thread
    lives. With more such workers than cores it stops letting idle workers spin: a worker then sleeps between
    two parallel regions and every region pays its wake-up. A process whose other threads have used torch (a
    data loader, a metrics thread) runs so; a fresh benchmark process does not. An eager module, whose ATen ops
    each open a region, can pay more for it than compiled code, which runs fewer, fused ones."""
    import torch

    ran, release = threading.Event(), threading.Event()

    def park() -> None:
        ones = torch.ones(1 << 20)
        ones.add_(1).sum()  # a million elements: above ATen's grain size, so the op runs in parallel
        ran.set()
        release.wait()

    threading.Thread(target=park, name="parked-openmp-team", daemon=True).start()
    ran.wait()
    return release


def report(measured: Sequence[Measured]) -> dict[str, Any]:
    """The JSON-safe figures: the summary, what misses the targets, and every point."""
    s = summarize(measured)
    return {
        "summary": asdict(s),
        "problems": acceptance_problems(s),
        "points": [asdict(m) for m in measured],
    }


def markdown(figures: Mapping[str, Any]) -> list[str]:
    """Lines for ``perf.md``: P2 at the representative shapes and over the grid, then every point."""
    s = figures.get("summary") or {}
    if not s:
        return []

    def fmt(v: float | None) -> str:
        return "not measured" if v is None else f"{v:.3f}"

    lines = [
        "",
        "## P2 over the declared ranges (Kasmina / bare module, interleaved, 95% interval)",
        "",
        f"P2 at the representative shapes: {fmt(s['representative'])} (target <= {P2_REPRESENTATIVE_MAX}); over the "
        f"grid of the declared ranges: {fmt(s['grid'])} (target <= {P2_GRID_MAX}); {s['points']} points. "
        f"Slower than the bare module by more than {SLOWER_BY:.0%} with confidence: "
        + (", ".join(s["slower"]) or "none")
        + ".",
        "",
        "| blueprint | kind | shape | path | bare ms | Kasmina / bare [interval] | coverage |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in figures.get("points", []):
        mark = "!" if slower_with_confidence(m["low"], m.get("coverage", 0.0)) else ""
        lines.append(
            f"| {m['blueprint']} | {m['kind']} | {m['label']} | {m['path']} | {m['eager_ms']:.3g} "
            f"| {m['ratio']:.2f} [{m['low']:.2f}-{m['high']:.2f}]{mark} | {m.get('coverage', 0.0):.0%} |"
        )
    return lines


def arguments(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The command line :func:`main` takes (:mod:`benchmarks.processes` takes it too, for its child processes)."""
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.grid", description=__doc__.split("\n\n")[0], add_help=add_help
    )
    parser.add_argument("--urza", type=Path, default=root / ".esper" / "urza.db")
    parser.add_argument("--blueprints", type=Path, action="append", default=None)
    parser.add_argument("-k", action="append", default=[], help="a blueprint name (repeatable; default: all)")
    parser.add_argument(
        "--kind", action="append", choices=KINDS, default=None, help="only this kind of point (repeatable)"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--openmp-team", action="store_true", help="measure beside a parked OpenMP team")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    opts = arguments().parse_args(argv)
    if opts.openmp_team:
        park_openmp_team()
    measured = measure_urza(
        opts.urza,
        opts.blueprints or [root / "blueprints"],
        opts.k,
        rounds=opts.rounds,
        calls=opts.calls,
        kinds=opts.kind or KINDS,
    )
    figures = report(measured)
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2) + "\n")
    print("\n".join(markdown(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
