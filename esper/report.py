"""The certification report: a reviewer's page rendered from Urza's evidence alone (nothing is compiled or
measured again). ``esper report`` writes ``report.md`` with one PNG per blueprint, and ``report.html`` with
the same content and the plots embedded, so it is a single self-contained file.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.compat import CompatKey
from esper.evidence import parity_error
from esper.urza import Entry, Urza


@dataclass(frozen=True)
class BlueprintEvidence:
    """The entries a report shows for one blueprint: its current routes and every measured candidate."""

    name: str
    routes: list[Entry]
    candidates: list[Entry]
    problem: str | None


def collect(urza: Urza, key: CompatKey) -> list[BlueprintEvidence]:
    from esper.kasmina.loader import Unusable, choose_entries

    by_name: dict[str, list[Entry]] = defaultdict(list)
    for e in urza.entries():
        by_name[e.blueprint].append(e)
    out = []
    for name in sorted(by_name):
        entries = by_name[name]
        try:
            routes, problem = choose_entries(entries, key), None
        except Unusable as u:
            routes, problem = [], u.detail
        version = routes[0].blueprint_version if routes else entries[0].blueprint_version
        newest: dict[tuple[str, str], Entry] = {}
        for e in entries:  # newest first
            if e.blueprint_version == version and "certify" in e.performance:
                newest.setdefault((e.profile, e.variant), e)
        out.append(BlueprintEvidence(name, routes, list(newest.values()), problem))
    return out


def _x(label: str) -> tuple[str, int] | None:
    """The plotted dim of a shape label: ``batch`` if present, else the first dim."""
    parts = dict(p.split("=") for p in label.split(",") if "=" in p)
    if not parts:
        return None
    dim = "batch" if "batch" in parts else next(iter(parts))
    return dim, int(parts[dim])


def plot(ev: BlueprintEvidence, path: Path) -> Path | None:
    """Latency against the batch dim: eager, each variant, and the routed kernel, with bucket edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = defaultdict(dict)
    dim = None
    for e in ev.candidates:
        for label, row in e.performance["certify"].items():
            x = _x(label)
            if x is None:
                continue
            dim, size = x
            if "eager" in row:
                series["eager"][size] = row["eager"]["p50_ms"]
            if "compiled" in row:
                series[e.variant][size] = min(row["compiled"]["p50_ms"], series[e.variant].get(size, math.inf))
    for r in ev.routes:
        for label, row in r.performance.get("certify", {}).items():
            x = _x(label)
            if x is not None:
                series["routed"][x[1]] = row["compiled" if r.kind == "aoti" else "eager"]["p50_ms"]
    if not series or dim is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in sorted(series.items(), key=lambda kv: (kv[0] == "routed", kv[0])):
        xs = sorted(points)
        style = {"linewidth": 3, "alpha": 0.5, "color": "black"} if name == "routed" else {"marker": "o"}
        ax.plot(xs, [points[x] for x in xs], label=name, **style)  # type: ignore[arg-type]
    for e in ev.routes:
        lo = e.meta.get("ranges", {}).get(dim, [None])[0]
        if lo and lo > 1:
            ax.axvline(lo - 0.5, linestyle="--", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(dim)
    ax.set_ylabel("p50 ms")
    ax.set_title(ev.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _rows(ev: BlueprintEvidence) -> list[list[str]]:
    rows = []
    route_ids = {r.id for r in ev.routes}
    for e in sorted(ev.candidates, key=lambda e: (e.profile, e.variant)):
        err, cases = parity_error(e)
        perf = e.performance["certify"]
        cells = "; ".join(
            f"{label}: {_fmt(row.get('compiled', row.get('eager', {})).get('p50_ms'))}"
            + (f" ({_fmt(row['ratio'], 2)}x)" if "ratio" in row else "")
            for label, row in perf.items()
        )
        why = (e.failure_reason or "").splitlines()[0][:90] if e.failure_reason else ""
        rows.append(
            [
                e.profile,
                e.variant,
                e.kind,
                e.status + (" (routed)" if e.id in route_ids else ""),
                f"#{e.id}",
                _fmt(err, 2),
                str(cases or ""),
                cells,
                why,
            ]
        )
    return rows


HEADERS = ["profile", "variant", "kind", "status", "entry", "parity max|err|", "cases", "p50 ms (ratio)", "note"]


def render(urza_path: Path, out: Path, key: CompatKey) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and a self-contained ``report.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with Urza(urza_path, readonly=True) as urza:
        evidence = collect(urza, key)
    md = [f"# Esper certification report\n\nUrza: `{urza_path}`; this process's key: `{key}`.\n"]
    body = [
        f"<h1>Esper certification report</h1><p>Urza: <code>{html.escape(str(urza_path))}</code>; "
        f"key: <code>{html.escape(str(key))}</code></p>"
    ]
    for ev in evidence:
        context = next((e.meta.get("certification", {}).get("context") for e in ev.candidates), None) or {}
        routes = ", ".join(f"{r.profile} -> {r.variant if r.kind == 'aoti' else 'eager'} (#{r.id})" for r in ev.routes)
        head = (
            f"Routes: {routes or 'none: ' + (ev.problem or '')}. Measured on {context.get('host', '?')} "
            f"({context.get('cpu_count', '?')} cores, {context.get('cpu_capability', '?')}, torch "
            f"{context.get('torch', '?')}, commit {str(context.get('git_commit'))[:10]})."
        )
        png = plot(ev, out / f"{ev.name}.png") if ev.candidates else None
        rows = _rows(ev)
        md += [f"## {ev.name}\n", head + "\n"]
        if rows:
            md += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
            md += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        if png:
            md.append(f"\n![{ev.name}]({png.name})\n")
        body.append(f"<h2>{html.escape(ev.name)}</h2><p>{html.escape(head)}</p>")
        if rows:
            body.append(
                "<table border=1 cellspacing=0 cellpadding=3><tr>"
                + "".join(f"<th>{h}</th>" for h in HEADERS)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
        if png:
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(ev.name)}" src="data:image/png;base64,{data}"></p>')
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(
        "<!doctype html><meta charset=utf-8><title>Esper certification report</title>"
        "<body style='font-family:sans-serif'>" + "".join(body) + "</body>\n"
    )
    return md_path, html_path


def summary(evidence: list[BlueprintEvidence]) -> list[dict[str, Any]]:
    return [{"blueprint": ev.name, "routes": [r.id for r in ev.routes], "problem": ev.problem} for ev in evidence]
