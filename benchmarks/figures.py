"""Turning the suite's figures into ``perf.md`` (tables against the targets) and latency plots."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from esper.urza import evidence

TARGETS = {
    "P1": "median <= 15 ms, >= 1000x faster than cold torch.compile",
    "P2": "geomean <= 0.55 of eager, no certified compiled path slower than eager",
    "P2 over the ranges": "Kasmina / bare module geomean <= 0.65 at the representative shapes and <= 0.8 over a "
    "grid of the declared ranges, no shape slower than the bare module by more than 5% with confidence",
    "P2b": "<= 0.7 of warm torch.compile",
    "P3": "<= 2 us per call",
    "P4": "cold <= 10 min, unchanged <= 10 s",
    "P5": "<= 50 ms, no compiler imported",
    "floor": "Kasmina overhead above the raw runner <= max(3 us, 5% of the call)",
    "training": "compiled training step <= 0.7 of eager, geomean over the blueprints that train compiled",
    "seeds": "seed switch <= 0.5 ms (100 seeds of residual_mlp, alternating every call)",
}


def geomean(values: list[float]) -> float | None:
    """The geometric mean of the positive ``values`` (``None`` when there are none: a figure not measured)."""
    values = [v for v in values if v and v > 0]
    return evidence.geomean(values) if values else None


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    """The one number per target."""
    p1 = figures.get("P1", {})
    p2 = figures.get("P2", {})
    out: dict[str, Any] = {}
    if p1:
        out["P1 Kasmina first use, median ms"] = sorted(v["kasmina_ms"] for v in p1.values())[len(p1) // 2]
        out["P1 cold torch.compile / Kasmina, min"] = min(v["cold_over_kasmina"] for v in p1.values())
    ratios = {k: r for k, v in p2.items() if (r := p2_ratio(v, "kasmina")) is not None}
    if ratios:
        out["P2 Kasmina / eager, geomean"] = geomean(list(ratios.values()))
        out["P2 Kasmina / eager, worst"] = max(ratios.values())
        out["P2 shapes where Kasmina is surely slower than eager"] = sum(
            v.get("ratios", {}).get("kasmina", {}).get("decision") == "loses" for v in p2.values()
        )
        before = [r for v in p2.values() if (r := p2_ratio(v, "kasmina_default")) is not None]
        out["P2 default variant alone / eager, geomean (before)"] = geomean(before)
        warm = [
            k / c
            for v in p2.values()
            if (k := p2_ratio(v, "kasmina")) is not None and (c := p2_ratio(v, "compile_warm"))
        ]
        out["P2b Kasmina / warm torch.compile, geomean"] = geomean(warm)
    grid_summary = figures.get("P2grid", {}).get("summary")
    if grid_summary:
        out["P2 over the ranges: representative shapes, geomean"] = grid_summary["representative"]
        out["P2 over the ranges: grid of the declared ranges, geomean"] = grid_summary["grid"]
        out["P2 over the ranges: shapes slower than the bare module by >5% with confidence"] = len(
            grid_summary["slower"]
        )
    if figures.get("P3"):
        out["P3 guard + routing, max us"] = max(v["us"] for v in figures["P3"].values())
    if figures.get("P4"):
        out["P4 certify cold, s"] = figures["P4"]["cold"]["seconds"]
        out["P4 certify unchanged, s"] = figures["P4"]["unchanged"]["seconds"]
    if figures.get("P5"):
        out["P5 import esper.kasmina beyond torch, median ms"] = figures["P5"]["median_ms"]
    floor = [r for r in figures.get("floor", {}).get("blueprints", {}).values() if "overhead_us" in r]
    if floor:
        out["floor: Kasmina overhead above the raw runner, max us"] = max(r["overhead_us"] for r in floor)
        out["floor: blueprints over the overhead target"] = sum(not r["meets_target"] for r in floor)
    eager = list(figures.get("floor", {}).get("eager", {}).values())
    if eager:
        out["floor: eager route / bare module, max ratio"] = max(e["ratio"] for e in eager)
        out["floor: blueprints over the eager target"] = sum(not e["meets_target"] for e in eager)
    steps = training_ratios(figures)
    if steps:
        out["training step compiled / eager, geomean"] = geomean(list(steps.values()))
    inference = figures.get("seeds", {}).get("inference", {})
    if "switch_cost_ms" in inference:
        out["seed switch (100 seeds, alternating every call), ms"] = inference["switch_cost_ms"]
    return out


def p2_ratio(row: dict[str, Any], path: str) -> float | None:
    """A P2 path's ratio to eager: the median of per-round ratios measured interleaved with eager (``None``
    when the path was not measured)."""
    ratio = row.get("ratios", {}).get(path)
    return None if ratio is None else float(ratio["ratio"])


def training_ratios(figures: dict[str, Any]) -> dict[str, float]:
    """Per ``blueprint[shape]`` that trains compiled, the training step's compiled / eager ratio."""
    return {
        f"{name}[{shape}]": v["ratio"]
        for name, row in figures.get("training", {}).items()
        for shape, v in row.get("steps", {}).items()
    }


def lever_geomeans(levers: dict[str, Any]) -> dict[str, tuple[float | None, int, int]]:
    """Per lever: the geomean of its ratio to eager over the shapes measured, how many, and how many it wins."""
    ratios: dict[str, list[float]] = {}
    wins: dict[str, int] = {}
    for bp in levers.get("blueprints", {}).values():
        for lever, lv in bp["levers"].items():
            for r in lv.get("shapes", {}).values():
                ratios.setdefault(lever, []).append(r["ratio"])
                wins[lever] = wins.get(lever, 0) + (r["decision"] == "wins")
    return {k: (geomean(v), len(v), wins.get(k, 0)) for k, v in ratios.items()}


def extra_sections(figures: dict[str, Any]) -> list[str]:
    """The floor, the lever study, training steps and seeds, where measured."""
    lines: list[str] = []
    floor = figures.get("floor", {}).get("blueprints", {})
    if floor:
        lines += [
            "",
            "## Floor: the raw AOTInductor runner and Kasmina's overhead above it (smallest representative shape)",
            "",
            "| blueprint | shape | raw run us | kernel us | overhead us (median of paired differences) [quartiles] "
            "(all blocks) | A/A us [quartiles] | target us | guard + call us | Python penalty us | quiet blocks |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in sorted(floor.items()):
            if "overhead_us" not in r:
                lines.append(f"| {name} | | skipped: {r.get('skipped', '')} | | | | | | | |")
                continue
            p = r["paths"]
            shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
            # Older results (before the floor split its overhead) lack the parts.
            parts = f"{r['guard_us']:.2f} + {r['call_us']:.2f}" if "guard_us" in r else "-"
            penalty = f"{r['python_penalty_us']:.2f}" if "python_penalty_us" in r else "-"
            # Older results (differences of rounds, before paired blocks) have no quartiles.
            spread = f" [{r['overhead_q1_us']:.2f}-{r['overhead_q3_us']:.2f}]" if "overhead_q1_us" in r else ""
            # Older results (before blocks were judged quiet) have one figure for every block.
            every = f" ({r['overhead_all_blocks_us']:.2f})" if "overhead_all_blocks_us" in r else ""
            calm = f"{r['blocks']['quiet']} of {r['blocks']['count']}" if "quiet" in r.get("blocks", {}) else "-"
            # Older results (before the runner was measured twice) have no A/A figure.
            twin = f"{r['twin_us']:.2f} [{r['twin_q1_us']:.2f}-{r['twin_q3_us']:.2f}]" if "twin_us" in r else "-"
            lines.append(
                f"| {name} | {shape} | {p['raw']['us']:.2f} | {p['kernel']['us']:.2f} | {r['overhead_us']:.2f}{spread}"
                f"{every} | {twin} | {r['target_us']:.2f}{'' if r['meets_target'] else ' (missed)'} | {parts} "
                f"| {penalty} "
                f"| {calm} |"
            )
    eager = figures.get("floor", {}).get("eager", {})
    if eager:
        lines += [
            "",
            "## Eager floor: a kernel serving the module eager against the bare module (smallest representative shape)",
            "",
            "| blueprint | shape | bare us | eager route us | ratio [quartiles] | target |",
            "|---|---|---|---|---|---|",
        ]
        for name, e in sorted(eager.items()):
            shape = ",".join(f"{k}={v}" for k, v in e["shape"].items())
            spread = f" [{e['ratio_q1']:.3f}-{e['ratio_q3']:.3f}]" if "ratio_q1" in e else ""
            lines.append(
                f"| {name} | {shape} | {e['paths']['bare']['us']:.2f} | {e['paths']['eager_route']['us']:.2f} "
                f"| {e['ratio']:.3f}{spread} | {'met' if e['meets_target'] else 'missed'} |"
            )
    levers = figures.get("levers")
    if levers:
        lines += [
            "",
            f"## Lever study ({levers.get('mode', '')} mode; full tables in levers.md)",
            "",
            "| lever | geomean ratio to eager | shapes | wins (by the margin, with confidence) |",
            "|---|---|---|---|",
        ]
        for lever, (g, n, w) in lever_geomeans(levers).items():
            lines.append(f"| {lever} | {g:.3f} | {n} | {w} |" if g else f"| {lever} | | {n} | {w} |")
        skipped = {
            lever: lv["skipped"]
            for bp in levers.get("blueprints", {}).values()
            for lever, lv in bp["levers"].items()
            if "skipped" in lv
        }
        lines += [f"- {k} skipped: {v}" for k, v in skipped.items()]
        from benchmarks.levers import markdown as lever_tables

        lines += ["", lever_tables(levers).rstrip("\n")]
    training = figures.get("training")
    if training:
        lines += [
            "",
            "## Training step, compiled / eager",
            "",
            "| blueprint | route | per shape | geomean |",
            "|---|---|---|---|",
        ]
        for name, row in sorted(training.items()):
            steps = row.get("steps", {})
            cells = "; ".join(f"{k}: {v['ratio']:.2f}" for k, v in steps.items())
            g = geomean([v["ratio"] for v in steps.values()])
            note = cells or str(row.get("reason", ""))[:120]
            lines.append(f"| {name} | {row.get('route', '')} | {note} | {f'{g:.2f}' if g else ''} |")
    seeds = figures.get("seeds")
    if seeds:
        lines += [
            "",
            f"## {seeds.get('seeds')} seeds of {seeds.get('blueprint')}",
            "",
            "| kind | switch cost ms [min-max] | call alternating ms | call same seed ms | bind ms/seed "
            "| RSS MiB/seed |",
            "|---|---|---|---|---|---|",
        ]
        for kind in ("inference", "training"):
            s = seeds.get(kind)
            if not s:
                continue
            lines.append(
                f"| {kind} | {s.get('switch_cost_ms', '')} [{s.get('switch_cost_min_ms', '')}-"
                f"{s.get('switch_cost_max_ms', '')}] | {s.get('switch_call_ms', s.get('call_ms_round_robin'))} "
                f"| {s.get('same_seed_call_ms', s.get('call_ms_same_seed'))} | {s.get('bind_ms_per_seed')} "
                f"| {s.get('rss_overhead_mb_per_seed')} |"
            )
    return lines


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
        "| shape | eager ms | route | Kasmina / eager [95%] | default only / eager | Kasmina / warm compile |",
        "|---|---|---|---|---|---|",
    ]
    for key, v in sorted(figures.get("P2", {}).items()):
        if "eager" not in v:
            continue
        k, d, c = (p2_ratio(v, path) for path in ("kasmina", "kasmina_default", "compile_warm"))
        interval = v.get("ratios", {}).get("kasmina")
        kasmina = "" if k is None else f"{k:.2f}"
        if interval:
            mark = {"wins": "*", "loses": "!"}.get(interval["decision"], "")
            kasmina += f" [{interval['low']:.2f}-{interval['high']:.2f}]{mark}"
        lines.append(
            f"| {key} | {v['eager']:.3g} | {v.get('route', '')} | {kasmina} | {'' if d is None else f'{d:.2f}'} "
            f"| {'' if k is None or not c else f'{k / c:.2f}'} |"
        )
    from benchmarks.grid import markdown as grid_tables

    lines += grid_tables(figures.get("P2grid", {}))
    lines += extra_sections(figures)
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
            ax.plot(xs, ys, label=label, **style)
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
