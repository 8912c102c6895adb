"""Turning the suite's figures into ``perf.md`` (tables against the targets) and latency plots."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

TARGETS = {
    "P1": "median <= 15 ms, >= 1000x faster than cold torch.compile",
    "P2": "geomean <= 0.55 of eager, no certified compiled path slower than eager",
    "P2b": "<= 0.7 of warm torch.compile",
    "P3": "<= 2 us per call",
    "P4": "cold <= 10 min, unchanged <= 10 s",
    "P5": "<= 50 ms, no compiler imported",
}


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    """The one number per target."""
    p1 = figures.get("P1", {})
    p2 = figures.get("P2", {})
    out: dict[str, Any] = {}
    if p1:
        out["P1 Kasmina first use, median ms"] = sorted(v["kasmina_ms"] for v in p1.values())[len(p1) // 2]
        out["P1 cold torch.compile / Kasmina, min"] = min(v["cold_over_kasmina"] for v in p1.values())
    ratios = {k: v["kasmina"] / v["eager"] for k, v in p2.items() if "kasmina" in v and "eager" in v}
    if ratios:
        out["P2 Kasmina / eager, geomean"] = geomean(list(ratios.values()))
        out["P2 Kasmina / eager, worst"] = max(ratios.values())
        before = [v["kasmina_default"] / v["eager"] for v in p2.values() if "kasmina_default" in v and "eager" in v]
        out["P2 default variant alone / eager, geomean (before)"] = geomean(before)
        warm = [v["kasmina"] / v["compile_warm"] for v in p2.values() if "compile_warm" in v and "kasmina" in v]
        out["P2b Kasmina / warm torch.compile, geomean"] = geomean(warm)
    if figures.get("P3"):
        out["P3 guard + routing, max us"] = max(v["us"] for v in figures["P3"].values())
    if figures.get("P4"):
        out["P4 certify cold, s"] = figures["P4"]["cold"]["seconds"]
        out["P4 certify unchanged, s"] = figures["P4"]["unchanged"]["seconds"]
    if figures.get("P5"):
        out["P5 import esper.kasmina beyond torch, median ms"] = figures["P5"]["median_ms"]
    return out


def markdown(figures: dict[str, Any]) -> str:
    lines = [
        f"Machine: {platform.node()}, {platform.machine()}, {figures.get('machine', '')}",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in headline(figures).items() if v is not None]
    lines += [
        "",
        "Targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()),
        "",
        "| blueprint | Kasmina first use ms | cold torch.compile ms | warm torch.compile ms | guard+route us |",
        "|---|---|---|---|---|",
    ]
    for name, p1 in sorted(figures.get("P1", {}).items()):
        p3 = figures.get("P3", {}).get(name, {}).get("us")
        lines.append(
            f"| {name} | {p1['kasmina_ms']:.3g} | {p1['compile_cold_ms']:.0f} | {p1['compile_warm_ms']:.0f} "
            f"| {p3:.3g} |"
            if p3 is not None
            else f"| {name} | {p1['kasmina_ms']:.3g} | | | |"
        )
    lines += [
        "",
        "| shape | eager ms | Kasmina / eager | default only / eager | Kasmina / warm compile |",
        "|---|---|---|---|---|",
    ]
    for key, v in sorted(figures.get("P2", {}).items()):
        if "eager" not in v:
            continue

        def r(a: str, b: str, v: dict[str, float] = v) -> str:
            return f"{v[a] / v[b]:.2f}" if a in v and b in v else ""

        lines.append(
            f"| {key} | {v['eager']:.3g} | {r('kasmina', 'eager')} | {r('kasmina_default', 'eager')} "
            f"| {r('kasmina', 'compile_warm')} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweeps(figures: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, sweep in sorted(figures.get("sweep", {}).items()):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, points in sorted(sweep["series"].items(), key=lambda kv: (kv[0] == "routed", kv[0])):
            xs = sorted(int(x) for x in points)
            ys = [points[x] if x in points else points[str(x)] for x in xs]
            style = {"linewidth": 3, "alpha": 0.5, "color": "black"} if label == "routed" else {"marker": "o"}
            ax.plot(xs, ys, label=label, **style)  # type: ignore[arg-type]
        for edge in sweep["bucket_edges"]:
            ax.axvline(edge - 0.5, linestyle="--", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep["dim"])
        ax.set_ylabel("p50 ms")
        ax.set_title(f"{name} (dashed: bucket edges)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"latency_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(figures: dict[str, Any], out: Path) -> None:
    import torch

    figures["machine"] = (
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
    )
    figures["headline"] = headline(figures)
    (out / "perf.md").write_text(markdown(figures))
    plot_sweeps(figures, out)
