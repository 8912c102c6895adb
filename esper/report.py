"""The certification report: a reviewer's page rendered from Urza's evidence alone (nothing is compiled or
measured again). ``esper report`` writes ``report.md`` with one PNG per blueprint and artifact kind, and
``report.html`` with the same content and the plots embedded, so it is a single self-contained file.

A route certified by region (:class:`~esper.urza.evidence.RouteTable`) gets its own lines and plot: every grid
point's ratio to eager with its confidence interval along each dim, compiled cells and eager cells marked, each
point labelled by its full shape.

Each artifact kind is its own section with its own table and plot: an inference figure is the latency of a
forward call, a training figure the latency of a training step (forward and backward), so the two are never
drawn in one series or compared in one column.

The plots need matplotlib, which the runtime install leaves out: ``pip install 'esper[report]'``.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.artifacts.compat import CompatKey
from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint
from esper.urza import Entry, EntryEngine, Urza
from esper.urza.evidence import COMPILED, Evidence, RegionCell, RouteTable

INSTALL_HINT = "pip install 'esper[report]'"
ROUTED = "routed"
EAGER = "eager"

# What one figure of each kind measures: the plot's y label and the section's heading.
MEASURES = {
    ArtifactKind.INFERENCE: "p50 ms per forward call",
    ArtifactKind.TRAINING: "p50 ms per training step (forward + backward)",
}


class ReportError(RuntimeError):
    """The report cannot be rendered: matplotlib is missing, or Urza cannot be read."""


@dataclass(frozen=True)
class KindEvidence:
    """One artifact kind of one blueprint: its current routes, every measured candidate, and why there is no
    route (``problem``) when there is none."""

    kind: ArtifactKind
    routes: tuple[Entry, ...]
    candidates: tuple[Entry, ...]
    problem: str | None


@dataclass(frozen=True)
class BlueprintEvidence:
    """What a report shows for one blueprint: a :class:`KindEvidence` per artifact kind Urza holds for it."""

    name: str
    kinds: tuple[KindEvidence, ...]

    def of(self, kind: ArtifactKind) -> KindEvidence | None:
        return next((k for k in self.kinds if k.kind == kind), None)


def _choosers() -> dict[ArtifactKind, Callable[[Sequence[Entry], CompatKey], list[Entry]]]:
    """Kasmina's own choice of routes per kind, so the report shows what a run would load."""
    from esper.kasmina.choose import choose_entries, choose_training_entry

    return {ArtifactKind.INFERENCE: choose_entries, ArtifactKind.TRAINING: choose_training_entry}


def collect_kind(entries: Sequence[Entry], kind: ArtifactKind, key: CompatKey) -> KindEvidence:
    """The evidence of one kind from one blueprint's entries (newest first, any kinds mixed)."""
    from esper.kasmina.unusable import Unusable

    mine = [e for e in entries if e.artifact == kind]
    try:
        routes, problem = _choosers()[kind](mine, key), None
    except Unusable as u:
        routes, problem = [], u.detail
    if not mine:
        return KindEvidence(kind, (), (), problem)
    version = routes[0].blueprint_version if routes else mine[0].blueprint_version
    newest: dict[tuple[str, str, str], Entry] = {}
    for e in mine:
        if e.blueprint_version == version and Evidence.of(e).certified:
            newest.setdefault((e.profile, e.variant, e.engine), e)
    return KindEvidence(kind, tuple(routes), tuple(newest.values()), problem)


def collect(urza: Urza, key: CompatKey) -> list[BlueprintEvidence]:
    """Every blueprint in ``urza``, by name, with the evidence of each artifact kind it has entries of."""
    by_name: dict[str, list[Entry]] = defaultdict(list)
    for e in urza.entries():
        by_name[e.blueprint].append(e)
    return [
        BlueprintEvidence(
            name,
            tuple(
                collect_kind(by_name[name], k, key) for k in ArtifactKind if any(e.artifact == k for e in by_name[name])
            ),
        )
        for name in sorted(by_name)
    ]


def _x(label: str) -> tuple[str, int] | None:
    """The plotted dim of a shape label: ``batch`` if present, else the first dim."""
    parts = Blueprint.label_sizes(label)
    if not parts:
        return None
    dim = "batch" if "batch" in parts else next(iter(parts))
    return dim, parts[dim]


def series(ev: KindEvidence) -> tuple[str | None, dict[str, dict[int, float]]]:
    """The plotted dim and p50 series of one kind: ``eager``, one per Inductor variant (its best profile at
    each size), and ``routed`` (what the routes run). Only ``ev``'s own entries contribute, so a training step
    is never drawn beside a forward call. Where candidates measured eager differently, the newest figure is
    drawn (candidates are newest first)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    dim = None
    for e in ev.candidates:
        for label, row in Evidence.of(e).performance.certify.items():
            x = _x(label)
            if x is None:
                continue
            dim, size = x
            if row.eager is not None and row.eager.p50_ms is not None:
                out[EAGER].setdefault(size, row.eager.p50_ms)
            if row.compiled is not None and row.compiled.p50_ms is not None:
                out[e.variant][size] = min(row.compiled.p50_ms, out[e.variant].get(size, math.inf))
    served: set[int] = set()  # sizes a route serves compiled: routes sharing a profile's cells each have one
    for r in ev.routes:
        evidence = Evidence.of(r)
        for label, row in evidence.performance.certify.items():
            x = _x(label)
            sizes = Blueprint.label_sizes(label)
            path = evidence.path_at(sizes)
            p50 = row.side(path).p50_ms
            if x is not None and p50 is not None and x[1] not in served:
                dim = dim or x[0]
                out[ROUTED][x[1]] = p50
                if path == COMPILED:
                    served.add(x[1])
    return dim, dict(out)


def plot(name: str, ev: KindEvidence, path: Path) -> Path | None:
    """Latency against the batch dim for one kind: eager, each variant and the routes, with bucket edges."""
    dim, lines = series(ev)
    if not lines or dim is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in sorted(lines.items(), key=lambda kv: (kv[0] == ROUTED, kv[0])):
        xs = sorted(points)
        style = {"linewidth": 3, "alpha": 0.5, "color": "black"} if label == ROUTED else {"marker": "o"}
        ax.plot(xs, [points[x] for x in xs], label=label, **style)
    for e in ev.routes:
        lo = Evidence.of(e).meta.ranges.get(dim, (None, None))[0]
        if lo and lo > 1:
            ax.axvline(lo - 0.5, linestyle="--", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(dim)
    ax.set_ylabel(MEASURES[ev.kind])
    ax.set_title(f"{name}: {ev.kind}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def route_tables(ev: KindEvidence) -> list[tuple[Entry, RouteTable]]:
    """The routes of one kind certified by region, with their tables."""
    return [(r, t) for r in ev.routes if (t := Evidence.of(r).meta.route_table) is not None]


def region_lines(ev: KindEvidence) -> list[str]:
    """One line per route table (profile, variant, compiled cells) and one per cell: its full shape, the ratio
    to eager with its interval and decision, and the path it serves (in a profile shared between candidates, the
    candidate whose compiled code serves a cell this entry does not)."""
    out = []
    for r, t in route_tables(ev):
        out.append(f"Route table of {r.profile}/{r.variant} (#{r.id}): {t.describe()}, cuts {list(t.cuts())}.")
        for c in t.cells:
            figures = (
                f"{_fmt(c.ratio, 3)}x [{_fmt(c.low, 3)}, {_fmt(c.high, 3)}] {c.decision}"
                if c.ratio is not None
                else c.why
            )
            served = f"compiled by {c.served_by}" if c.served_by else c.path
            out.append(f"- {c.label}: {figures} -> {served}")
    return out


def plot_regions(name: str, ev: KindEvidence, path: Path) -> Path | None:
    """Each route table's ratio to eager along each of its dims: one panel per dim, every measured point with
    its interval, green where the cell serves this entry's compiled code, blue where another candidate of the
    profile serves it compiled, red where it runs eager, labelled by its full shape; lines at parity (1) and at
    the margin a win must clear."""
    tables = route_tables(ev)
    if not tables:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r, t, d) for r, t in tables for d in range(len(t.dims))]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), squeeze=False)
    for ax, (r, t, d) in zip(axes[:, 0], panels, strict=True):
        dim = t.dims[d]
        for c in t.cells:
            if c.ratio is None:
                continue
            x = c.sizes[dim]
            color = _color(c)
            low, high = c.low if c.low is not None else c.ratio, c.high if c.high is not None else c.ratio
            ax.errorbar([x], [c.ratio], yerr=[[c.ratio - low], [high - c.ratio]], fmt="o", color=color, capsize=2)
            ax.annotate(c.label, (x, c.ratio), fontsize=6, xytext=(3, 3), textcoords="offset points")
        cuts = t.cuts()[d]
        for cut in cuts:
            ax.axvline(cut - 0.5, linestyle=":", color="grey", linewidth=0.8)
        if len(t.dims) == 1:  # one dim: the cells are intervals, shaded by the path they serve
            edges = [t.values[0][0], *(c - 0.5 for c in cuts), t.values[0][-1]]
            for i, c in enumerate(t.cells):
                ax.axvspan(edges[i], edges[i + 1], color=_color(c), alpha=0.08, linewidth=0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if t.margin is not None:
            ax.axhline(1.0 - t.margin, color="tab:green", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{dim} (dotted: cell edges)")
        ax.set_ylabel("compiled / eager")
        ax.set_title(
            f"{name} {ev.kind} {r.profile}/{r.variant}: {t.describe()}\n"
            "(green compiled, blue another candidate's compiled code, red eager)"
        )
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _color(cell: RegionCell) -> str:
    """A cell's colour in the region plots: what serves it."""
    if cell.path == COMPILED:
        return "tab:green"
    return "tab:blue" if cell.served_by else "tab:red"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def rows(ev: KindEvidence) -> list[list[str]]:
    """One table row per candidate of one kind, in :data:`HEADERS` order."""
    out = []
    route_ids = {r.id for r in ev.routes}
    for e in sorted(ev.candidates, key=lambda e: (e.profile, e.variant, e.engine)):
        evidence = Evidence.of(e)
        err, cases = evidence.parity.error()
        cells = "; ".join(
            f"{label}: {_fmt((row.compiled or row.side(EAGER)).p50_ms)}"
            + (f" ({_fmt(row.ratio, 2)}x)" if row.ratio is not None else "")
            for label, row in evidence.performance.certify.items()
        )
        why = (e.failure_reason or "").splitlines()[0][:90] if e.failure_reason else ""
        out.append(
            [
                e.profile,
                e.variant,
                str(e.engine),
                str(e.status) + (" (routed)" if e.id in route_ids else ""),
                f"#{e.id}",
                _fmt(err, 2),
                str(cases or ""),
                cells,
                why,
            ]
        )
    return out


HEADERS = ["profile", "variant", "kind", "status", "entry", "parity max|err|", "cases", "p50 ms (ratio)", "note"]


def _routes_line(ev: KindEvidence) -> str:
    routes = ", ".join(
        f"{r.profile} -> {r.variant if r.engine == EntryEngine.AOTI else EAGER} (#{r.id})" for r in ev.routes
    )
    return f"Routes: {routes or 'none: ' + (ev.problem or '')}. Figures: {MEASURES[ev.kind]}."


def _context_line(ev: BlueprintEvidence) -> str:
    context = next((Evidence.of(e).meta.context() for k in ev.kinds for e in k.candidates), None) or {}
    return (
        f"Measured on {context.get('host', '?')} ({context.get('cpu_count', '?')} cores, "
        f"{context.get('cpu_capability', '?')}, torch {context.get('torch', '?')}, "
        f"commit {str(context.get('git_commit'))[:10]})."
    )


def require_matplotlib() -> None:
    """:class:`ReportError` with what to install when matplotlib (the ``report`` extra) is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError(f"the report's plots need matplotlib, which is not installed: {INSTALL_HINT}")


def render(urza_path: Path, out: Path, key: CompatKey) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and a self-contained ``report.html`` into ``out``."""
    require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    with Urza(urza_path, readonly=True) as urza:
        evidence = collect(urza, key)
    md = [f"# Esper certification report\n\nUrza: `{urza_path}`; this process's key: `{key}`.\n"]
    body = [
        f"<h1>Esper certification report</h1><p>Urza: <code>{html.escape(str(urza_path))}</code>; "
        f"key: <code>{html.escape(str(key))}</code></p>"
    ]
    for ev in evidence:
        md += [f"## {ev.name}\n", _context_line(ev) + "\n"]
        body.append(f"<h2>{html.escape(ev.name)}</h2><p>{html.escape(_context_line(ev))}</p>")
        for kind in ev.kinds:
            png = plot(ev.name, kind, out / f"{ev.name}-{kind.kind}.png") if kind.candidates else None
            table = rows(kind)
            md += [f"### {kind.kind}\n", _routes_line(kind) + "\n"]
            body.append(f"<h3>{kind.kind}</h3><p>{html.escape(_routes_line(kind))}</p>")
            if table:
                md += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
                md += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table]
                body.append(
                    "<table border=1 cellspacing=0 cellpadding=3><tr>"
                    + "".join(f"<th>{h}</th>" for h in HEADERS)
                    + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table)
                    + "</table>"
                )
            if png:
                md.append(f"\n![{ev.name} {kind.kind}]({png.name})\n")
                data = base64.b64encode(png.read_bytes()).decode()
                alt = html.escape(f"{ev.name} {kind.kind}")
                body.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}"></p>')
            lines = region_lines(kind)
            if lines:
                md += ["", *lines, ""]
                body.append("<pre>" + html.escape("\n".join(lines)) + "</pre>")
            regions_png = plot_regions(ev.name, kind, out / f"{ev.name}-{kind.kind}-regions.png")
            if regions_png:
                md.append(f"\n![{ev.name} {kind.kind} route table]({regions_png.name})\n")
                data = base64.b64encode(regions_png.read_bytes()).decode()
                alt = html.escape(f"{ev.name} {kind.kind} route table")
                body.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}"></p>')
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(
        "<!doctype html><meta charset=utf-8><title>Esper certification report</title>"
        "<body style='font-family:sans-serif'>" + "".join(body) + "</body>\n"
    )
    return md_path, html_path


def summary(evidence: list[BlueprintEvidence]) -> list[dict[str, Any]]:
    """One flat row per blueprint and artifact kind: the routed entry ids, or why there is no route."""
    return [
        {"blueprint": ev.name, "artifact": k.kind.value, "routes": [r.id for r in k.routes], "problem": k.problem}
        for ev in evidence
        for k in ev.kinds
    ]
