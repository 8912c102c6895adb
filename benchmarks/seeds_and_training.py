"""Seeds and training: per catalog blueprint, the training route and the training-step ratio (compiled over
eager); and load time and resident memory for 100 seeds of one blueprint.

    .venv/bin/python benchmarks/seeds_and_training.py [--urza PATH] [--blueprint NAME ...] [--seeds-of NAME]

Compiles what it needs into its own Urza (default ``.esper/bench-training/urza.db``, reused between runs:
the first run compiles every catalog blueprint's training artifact, one at a time) and marks its entries
certified there, so that Kasmina loads them as a training run would. A step is the forward plus the backward
of a fixed upstream gradient; figures are p50 over repeated steps, compiled and eager alternating in rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from esper.blueprint import Blueprint
from esper.catalog import load_catalog
from esper.kasmina import Kasmina
from esper.numerics.gradients import step, upstream
from esper.numerics.inputs import example_inputs
from esper.urza import Urza

ROOT = Path(__file__).resolve().parent.parent

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size now (not the peak), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def p50_ms(fn: Any, seconds: float) -> float:
    for _ in range(3):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(samples) < 10 or time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(samples)


def compile_all(urza_path: Path, blueprints: list[Blueprint]) -> dict[str, dict[str, Any]]:
    """Each blueprint's training artifact (or its eager route), marked certified in this benchmark's Urza."""
    from esper.artifacts.kinds import ArtifactKind
    from esper.tezzeret.compiler import Tezzeret

    rows: dict[str, dict[str, Any]] = {}
    with Urza(urza_path) as urza:
        for bp in blueprints:
            outcome = Tezzeret(urza).compile(bp, artifact=ArtifactKind.TRAINING)
            e = outcome.entry
            if e.engine == "aoti" and e.status == "compiled":
                e = urza.update(e.id, status="certified")  # type: ignore[arg-type]
            rows[bp.name] = {
                "route": outcome.route,
                "entry": e.id,
                "compile_s": round(e.meta.get("compile_seconds", 0.0), 1),
                "reused": outcome.reused,
                "reason": e.failure_reason or "",
            }
            print(f"  {bp.name}: {rows[bp.name]['route']} (entry #{e.id}, {outcome.seconds:.1f} s)", flush=True)
    return rows


def training_ratios(kasmina: Kasmina, bp: Blueprint, seconds: float) -> dict[str, dict[str, float]]:
    """Training step p50, compiled and eager, at each representative shape."""
    kernel = kasmina.load_training(bp.name)
    eager = bp.build().train()
    out: dict[str, dict[str, float]] = {}
    for sizes in bp.representative:
        args = [a.requires_grad_(a.is_floating_point()) for a in example_inputs(bp, sizes)]
        with torch.no_grad():
            flat = [t for t in pytree.tree_leaves(eager(*args)) if isinstance(t, torch.Tensor)]
        grads = upstream(flat)
        compiled_runs, eager_runs = [], []
        for _ in range(3):  # alternate rounds: a shared machine's load drifts
            compiled_runs.append(p50_ms(lambda a=args, g=grads: step(kernel, a, g), seconds))
            eager_runs.append(p50_ms(lambda a=args, g=grads: step(eager, a, g), seconds))
        if kernel.last_path != "compiled":
            raise RuntimeError(f"{bp.name} trained {kernel.last_path}: {kernel.reason}")
        c, e = statistics.median(compiled_runs), statistics.median(eager_runs)
        out[Blueprint.shape_label(sizes)] = {"compiled_ms": c, "eager_ms": e, "ratio": c / e}
    return out


def hundred_seeds(kasmina: Kasmina, bp: Blueprint, urza_path: Path, n: int = 100) -> dict[str, Any]:
    """Bind ``n`` seeds, each with its own weights, to one inference kernel (``Kasmina.load_seeds``: swappable
    routes) and to one training kernel."""
    from esper.tezzeret.compiler import Tezzeret

    with Urza(urza_path) as urza:
        for profile in bp.profiles():  # every shape profile (bucket), default variant: what Kasmina routes
            entry = Tezzeret(urza).compile(bp, profile=profile).entry
            if entry.engine == "aoti" and entry.status == "compiled":
                urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    weights_mb = sum(t.numel() * t.element_size() for t in bp.build().state_dict().values()) / 2**20
    x = example_inputs(bp, bp.representative[0])
    result: dict[str, Any] = {"blueprint": bp.name, "seeds": n, "weights_mb_per_seed": round(weights_mb, 3)}
    for kind in ("inference", "training"):
        gc.collect()
        t0 = time.perf_counter()
        base: Any = kasmina.load_seeds(bp.name) if kind == "inference" else kasmina.load_training(bp.name)
        load_s = time.perf_counter() - t0
        states = []
        for k in range(n):
            g = torch.Generator().manual_seed(k)
            state = bp.build().state_dict()
            states.append({m: t + 0.01 * torch.randn(t.shape, generator=g) for m, t in state.items()})
        gc.collect()
        before = rss_mb()
        t0 = time.perf_counter()
        seeds = [base.bind(s) for s in states]
        bind_s = time.perf_counter() - t0
        gc.collect()
        after = rss_mb()
        with torch.no_grad():
            for s in seeds:  # first call of each seed (inference: swaps its weights into the shared package)
                s(*x)
            t0 = time.perf_counter()
            for _ in range(3):
                for s in seeds:
                    s(*x)
            round_robin_ms = (time.perf_counter() - t0) / (3 * n) * 1e3
            same_seed_ms = p50_ms(lambda s=seeds[0]: s(*x), 0.3)
            switch = seed_switch(seeds, x)
        result[kind] = {
            "load_base_ms": round(load_s * 1e3, 1),
            "bind_100_s": round(bind_s, 3),
            "bind_ms_per_seed": round(bind_s / n * 1e3, 2),
            "rss_delta_mb": round(after - before, 1),
            "rss_overhead_mb_per_seed": round((after - before) / n - weights_mb, 3),
            "call_ms_round_robin": round(round_robin_ms, 3),
            "call_ms_same_seed": round(same_seed_ms, 3),
            "paths": sorted({str(s.last_path) for s in seeds}),
            **switch,
        }
        del seeds, base, states
    return result


def seed_switch(seeds: list[Any], x: Sequence[torch.Tensor], rounds: int = 9) -> dict[str, float]:
    """The cost of switching seeds (target: <= 0.5 ms): per call, the seeds alternating every call (each call
    loads another seed's weights into the shared package) minus one seed repeated, the two loops interleaved
    in ``rounds`` rounds (median of per-round figures, and the spread of the per-round differences)."""
    n = len(seeds)
    switching, same, diffs = [], [], []
    with torch.no_grad():
        for r in range(rounds):
            figures = {}
            for kind in ("switch", "same") if r % 2 == 0 else ("same", "switch"):
                t0 = time.perf_counter_ns()
                if kind == "switch":
                    for s in seeds:
                        s(*x)
                else:
                    one = seeds[0]
                    for _ in range(n):
                        one(*x)
                figures[kind] = (time.perf_counter_ns() - t0) / n / 1e6
            switching.append(figures["switch"])
            same.append(figures["same"])
            diffs.append(figures["switch"] - figures["same"])
    return {
        "switch_call_ms": round(statistics.median(switching), 4),
        "same_seed_call_ms": round(statistics.median(same), 4),
        "switch_cost_ms": round(statistics.median(diffs), 4),
        "switch_cost_min_ms": round(min(diffs), 4),
        "switch_cost_max_ms": round(max(diffs), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--urza", type=Path, default=ROOT / ".esper" / "bench-training" / "urza.db")
    parser.add_argument("--blueprint", action="append", default=[], help="only these (repeatable)")
    parser.add_argument("--seeds-of", default="residual_mlp", help="the blueprint for the 100-seed figures")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per path, shape and round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    catalog = load_catalog([ROOT / "blueprints"])
    chosen = catalog.select(args.blueprint)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Urza {args.urza}", flush=True)
    print("training artifacts (compiled once, reused when unchanged):", flush=True)
    routes = compile_all(args.urza, chosen)
    kasmina = Kasmina(args.urza, catalog=catalog)
    print("\nblueprint             route     training step p50 ms, compiled/eager -> ratio, per representative shape")
    for bp in chosen:
        row = routes[bp.name]
        if row["route"] != "compiled":
            print(f"{bp.name:<21} eager     {row['reason'][:160]}")
            continue
        row["steps"] = training_ratios(kasmina, bp, args.seconds)
        cells = "; ".join(
            f"{label}: {v['compiled_ms']:.3f}/{v['eager_ms']:.3f} -> {v['ratio']:.2f}x"
            for label, v in row["steps"].items()
        )
        row["geomean_ratio"] = statistics.geometric_mean([v["ratio"] for v in row["steps"].values()])
        print(f"{bp.name:<21} compiled  {cells}  (geomean {row['geomean_ratio']:.2f}x)", flush=True)
    seeds = hundred_seeds(kasmina, catalog.get(args.seeds_of), args.urza)
    print(f"\n{seeds['seeds']} seeds of {seeds['blueprint']} ({seeds['weights_mb_per_seed']} MiB of weights each):")
    for kind in ("inference", "training"):
        s = seeds[kind]
        print(
            f"  {kind:<9} base kernel load {s['load_base_ms']} ms; bind 100 seeds {s['bind_100_s']} s "
            f"({s['bind_ms_per_seed']} ms each); RSS +{s['rss_delta_mb']} MiB "
            f"({s['rss_overhead_mb_per_seed']:+} MiB per seed beyond its weights); "
            f"a call {s['call_ms_round_robin']} ms round-robin over the seeds, {s['call_ms_same_seed']} ms "
            f"repeating one seed; seed switch {s['switch_cost_ms']} ms [{s['switch_cost_min_ms']}, "
            f"{s['switch_cost_max_ms']}] (interleaved); paths {s['paths']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"routes": routes, "seeds": seeds}, indent=2, default=str))


if __name__ == "__main__":
    main()
