"""The lever study: each catalog blueprint compiled under each candidate setting, measured against
eager interleaved in one process, at each representative shape.

    .venv/bin/python -m benchmarks.levers [--blueprint NAME ...] [--lever NAME ...] [--quick]
        [--catalog DIR] [--out DIR] [--cache DIR] [--static-shapes first|all]

A lever is an Inductor setting (a :data:`esper.artifacts.variants.CANDIDATES` entry: the one place that maps a name to
its settings) and how the blueprint is exported: with its declared dynamic dims, as Kasmina serves it, or
``static`` at one representative shape (an exact-size specialization: a static batch can take MKL's packed
GEMM where a dynamic one takes oneDNN's). Each lever goes through the real pipeline pieces:
:func:`esper.tezzeret.export.export_blueprint` (or ``torch.export`` at a static shape),
:func:`esper.tezzeret.aoti.compile_package`, :class:`esper.artifacts.runtime.CompiledPackage`.

Each (lever, shape) is timed against eager with :func:`~esper.certification.timing.compare`: interleaved rounds on the
same inputs, the ratio is the median of per-round ratios (candidate / eager, each a ratio of per-round medians),
with a distribution-free 95% interval and the min-max of the rounds. The output's max abs error against eager
flags a lever that is fast because it is wrong. Writes ``<out>/levers.json`` and ``levers.md`` (default
``.esper/bench``). ``--quick``: the served variants only, fewer rounds and calls, the first representative shape only.

Adopting a lever that wins by more than the noise somewhere is adding its name to
:data:`esper.artifacts.variants.SERVED`; a static lever is a shape-profile bucket of one size instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.artifacts.variants import SERVED

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Lever:
    """One candidate: an Inductor variant (by name, from esper.artifacts.variants.CANDIDATES) and the export."""

    name: str
    variant: str
    static: bool = False
    note: str = ""


# The study's candidates, in table order. The settings of each live in esper.artifacts.variants.CANDIDATES.
LEVERS: dict[str, Lever] = {
    lv.name: lv
    for lv in (
        Lever("default", "default", note="what Kasmina serves without variants"),
        Lever("freezing", "freezing"),
        Lever("wrapper_o2", "wrapper_o2", note="wrapper at -O2 (default -O1)"),
        Lever("wrapper_o3", "wrapper_o3", note="wrapper at -O3 (g++ 12 may crash compiling it: an ICE, recorded)"),
        Lever("wrapper_o3_lto", "wrapper_o3_lto", note="+ LTO (Inductor applies it with clang only)"),
        Lever("freezing_autotune_cpp", "freezing_autotune_cpp", note="max_autotune, CPP,ATEN GEMM backends"),
        Lever("runtime_constant_folding", "runtime_constant_folding"),
        Lever("threads_1", "threads_1", note="cpp.threads=1 vs the machine's"),
        Lever("static", "default", static=True, note="exact-size export at one representative shape"),
        Lever("static_freezing", "freezing", static=True),
    )
}
# Quick mode measures what certification compiles (each served variant is a lever of the same name).
QUICK_LEVERS = SERVED


def settings_of(lever: Lever) -> dict[str, Any]:
    from esper.artifacts.variants import CANDIDATES

    return dict(CANDIDATES[lever.variant].settings)


def inert_reason(lever: Lever) -> str | None:
    """Why compiling ``lever`` here would give the same code as another lever (it is then skipped)."""
    if settings_of(lever).get("aot_inductor.enable_lto"):
        from torch._inductor.cpp_builder import _is_clang, get_cpp_compiler

        compiler = get_cpp_compiler()
        if not _is_clang(compiler):
            return f"Inductor applies enable_lto only with clang; the C++ compiler here is {Path(compiler).name}"
    return None


def label(sizes: dict[str, int]) -> str:
    from esper.blueprint import Blueprint

    return Blueprint.shape_label(sizes)


def compile_lever(bp: Any, lever: Lever, sizes: dict[str, int] | None, workdir: Path) -> tuple[Any, float]:
    """The lever's loaded package and its compile seconds (export + AOTInductor)."""
    from esper.artifacts.runtime import CompiledPackage
    from esper.numerics.inputs import example_inputs
    from esper.tezzeret.aoti import compile_package
    from esper.tezzeret.export import export_blueprint

    module = bp.build().eval()
    t0 = time.perf_counter()
    if lever.static:
        assert sizes is not None
        ep = torch.export.export(module, tuple(example_inputs(bp, sizes)), strict=False)
    else:
        ep = export_blueprint(bp, module)
    suffix = f"-{label(sizes)}" if lever.static and sizes else ""
    path = compile_package(
        ep, workdir / f"{bp.name}-{lever.name}{suffix}.pt2".replace("=", "").replace(",", "_"), settings_of(lever)
    )
    seconds = time.perf_counter() - t0
    return CompiledPackage(path), seconds


def measure(package: Any, eager: torch.nn.Module, args: Sequence[torch.Tensor], quick: bool) -> dict[str, Any]:
    from esper.certification.timing import compare

    with torch.no_grad():
        expected = eager(*args)
        got = package(args)
        err = max(
            (float((g - e).abs().max()) for g, e in zip(_leaves(got), _leaves(expected), strict=True)), default=0.0
        )
        c = compare(
            lambda: package(args),
            lambda: eager(*args),
            min_rounds=4 if quick else 10,
            max_rounds=8 if quick else 40,
            rounds=2 if quick else 4,
            calls=5 if quick else 11,
            warmup=3,
        )
    return {
        "ratio": c.ratio,
        "low": c.low,
        "high": c.high,
        "min_round": min(c.ratios),
        "max_round": max(c.ratios),
        "decision": c.decision,
        "rounds": c.rounds,
        "candidate_ms": c.candidate_p50 * 1e3,
        "eager_ms": c.eager_p50 * 1e3,
        "max_abs_err": err,
    }


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def study_blueprint(bp: Any, levers: list[Lever], *, quick: bool, static_shapes: str, workdir: Path) -> dict[str, Any]:
    from esper.numerics.inputs import example_inputs

    shapes = [dict(r) for r in bp.representative][: 1 if quick else None]
    eager = bp.build().eval()
    out: dict[str, Any] = {"shapes": [label(s) for s in shapes], "levers": {}}
    for lever in levers:
        row: dict[str, Any] = {"note": lever.note, "settings": settings_of(lever), "static": lever.static}
        out["levers"][lever.name] = row
        inert = inert_reason(lever)
        if inert:
            row["skipped"] = inert
            print(f"  {lever.name}: skipped ({inert})", flush=True)
            continue
        targets: list[tuple[dict[str, int] | None, list[dict[str, int]]]]
        if lever.static:
            chosen = shapes if static_shapes == "all" else shapes[:1]
            targets = [(s, [s]) for s in chosen]
        else:
            targets = [(None, shapes)]
        row["compile_s"] = {}
        row["shapes"] = {}
        for compile_at, measure_at in targets:
            key = label(compile_at) if compile_at else "dynamic"
            try:
                package, seconds = compile_lever(bp, lever, compile_at, workdir)
            except Exception as e:  # a lever that does not compile is a figure too
                row["compile_s"][key] = None
                text = str(e)  # Inductor's compile errors start with the command line: keep the end too
                brief = text if len(text) <= 1500 else f"{text[:500]} ... {text[-1000:]}"
                row.setdefault("errors", {})[key] = f"{type(e).__name__}: {brief}"
                print(f"  {lever.name} [{key}]: compile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row["compile_s"][key] = seconds
            for sizes in measure_at:
                r = measure(package, eager, example_inputs(bp, sizes), quick)
                row["shapes"][label(sizes)] = r
                print(
                    f"  {lever.name} [{label(sizes)}]: {r['ratio']:.3f}x eager [{r['low']:.3f}, {r['high']:.3f}] "
                    f"{r['decision']}, compile {seconds:.1f} s, err {r['max_abs_err']:.2e}",
                    flush=True,
                )
            del package
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Lever study: {results['machine']}; {results['mode']} mode. Cells: candidate/eager, median of per-round "
        "ratios [95% interval]; `*` wins by the 5% margin with confidence, `!` loses with confidence.",
        "",
    ]
    for name, bp in sorted(results["blueprints"].items()):
        levers = bp["levers"]
        lines += [f"### {name}", "", "| shape | " + " | ".join(levers) + " |", "|---" * (len(levers) + 1) + "|"]
        for shape in bp["shapes"]:
            cells = []
            for lv in levers.values():
                r = lv.get("shapes", {}).get(shape)
                if r is None:
                    cells.append("")
                    continue
                mark = {"wins": "*", "loses": "!"}.get(r["decision"], "")
                cells.append(f"{r['ratio']:.2f} [{r['low']:.2f}-{r['high']:.2f}]{mark}")
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        compile_cells = []
        for lv in levers.values():
            if "skipped" in lv:
                compile_cells.append("skipped")
                continue
            secs = [s for s in lv.get("compile_s", {}).values() if s is not None]
            compile_cells.append(f"{sum(secs):.0f} s" if secs else "failed")
        lines.append("| compile | " + " | ".join(compile_cells) + " |")
        notes = [f"{k}: {v['skipped']}" for k, v in levers.items() if "skipped" in v]
        notes += [f"{k}: {e}" for k, v in levers.items() for e in v.get("errors", {}).values()]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    wins = summary(results)
    lines += ["### Levers that win somewhere (by the margin, with confidence)", ""]
    lines += [f"- {k}: {', '.join(v)}" for k, v in sorted(wins.items())] or ["- none"]
    return "\n".join(lines) + "\n"


def summary(results: dict[str, Any]) -> dict[str, list[str]]:
    """Per lever, the ``blueprint[shape]`` where it beats eager by the margin with confidence."""
    wins: dict[str, list[str]] = {}
    for name, bp in results["blueprints"].items():
        for lever, lv in bp["levers"].items():
            for shape, r in lv.get("shapes", {}).items():
                if r["decision"] == "wins":
                    wins.setdefault(lever, []).append(f"{name}[{shape}] {r['ratio']:.2f}")
    return wins


def run_study(
    catalog_dir: Path, names: list[str], lever_names: list[str], *, quick: bool, static_shapes: str, workdir: Path
) -> dict[str, Any]:
    from esper.catalog import load_catalog

    catalog = load_catalog([catalog_dir])
    chosen = catalog.select(names)
    picked = lever_names or (list(QUICK_LEVERS) if quick else list(LEVERS))
    unknown = [n for n in picked if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    levers = [LEVERS[n] for n in picked]
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}",
        "mode": "quick" if quick else "full",
        "levers": {lv.name: {"variant": lv.variant, "static": lv.static, "settings": settings_of(lv)} for lv in levers},
        "blueprints": {},
    }
    for bp in chosen:
        print(f"{bp.name}:", flush=True)
        results["blueprints"][bp.name] = study_blueprint(
            bp, levers, quick=quick, static_shapes=static_shapes, workdir=workdir
        )
    results["wins"] = summary(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--catalog", type=Path, default=ROOT / "blueprints")
    parser.add_argument("--blueprint", action="append", default=[], help="only these blueprints (repeatable)")
    parser.add_argument("--lever", action="append", default=[], help=f"only these levers (of {', '.join(LEVERS)})")
    parser.add_argument("--quick", action="store_true", help="the served variants, fewer rounds, first shape only")
    parser.add_argument(
        "--static-shapes",
        choices=("first", "all"),
        default="first",
        help="exact-size levers at the first representative shape, or at each",
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".esper" / "bench")
    parser.add_argument("--cache", type=Path, help="Inductor cache to use (default: a fresh one: cold compile times)")
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="esper-levers-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(a.cache or Path(tmp) / "inductor-cache")
        results = run_study(
            a.catalog, a.blueprint, a.lever, quick=a.quick, static_shapes=a.static_shapes, workdir=Path(tmp)
        )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "levers.json").write_text(json.dumps(results, indent=2) + "\n")
    (a.out / "levers.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def geomean_by_lever(results: dict[str, Any]) -> dict[str, float]:
    """Per lever, the geomean of its ratio to eager over every shape it was measured at (for perf.md)."""
    out: dict[str, float] = {}
    by: dict[str, list[float]] = {}
    for bp in results.get("blueprints", {}).values():
        for lever, lv in bp["levers"].items():
            by.setdefault(lever, []).extend(r["ratio"] for r in lv.get("shapes", {}).values() if r["ratio"] > 0)
    for lever, ratios in by.items():
        if ratios:
            out[lever] = statistics.geometric_mean(ratios)
    return out


if __name__ == "__main__":
    sys.exit(main())
