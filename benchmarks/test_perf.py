"""The performance suite: P1-P5, measured in one run on one machine.

- P5: import cost of the runtime (``import esper.kasmina``) beyond ``import torch``, in fresh processes.
- P4: certifying the whole catalog cold (new Urza, empty Inductor cache), then again with nothing changed.
- P1: first use in a fresh process: Kasmina (load + guard + first call) against ``torch.compile(dynamic=True)``
  first call with an empty and with a warm Inductor cache.
- P2: steady state per call against eager, in interleaved rounds (certification.timing.compare): the Kasmina kernel
  (routed), the default variant alone (what Kasmina ran before variants and buckets), and warm
  ``torch.compile(dynamic=True)`` (P2b).
- P2 over the ranges: the Kasmina kernel against the bare module at the representative shapes and over a grid of
  each profile's declared ranges, every point interleaved, with the targets asserted (benchmarks/grid.py).
- P3: guard check + routing cost per call (``Kernel.select``), and the floor: the raw AOTInductor runner per
  call and Kasmina's whole overhead above it (benchmarks/floor.py).
- levers: the lever study (benchmarks/levers.py), in a subprocess: ``ESPER_BENCH_LEVERS=quick`` (default:
  the served variants, first representative shape), ``full`` (every lever, every shape: long), ``reuse``
  (report the ``levers.json`` a separate run of the study wrote) or ``off``.
- training and seeds: training-step ratios per blueprint and the seed-switch cost over 100 seeds of
  residual_mlp (benchmarks/seeds_and_training.py), in a subprocess.
- sweep: latency against batch size for eager, every certified or losing candidate, and the routed kernel.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.conftest import CATALOG, ROOT
from esper.blueprint import Blueprint
from esper.catalog import load_catalog
from esper.numerics.bench import measure
from esper.numerics.inputs import example_inputs
from esper.profiles import contains

BLUEPRINTS = sorted(load_catalog([CATALOG]).blueprints.values(), key=lambda b: b.name)
CASES = [(bp.name, Blueprint.shape_label(r)) for bp in BLUEPRINTS for r in bp.representative]
KASMINA_SAMPLES = 5


def _run(args: list[str], env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_p5_runtime_import(results: dict[str, Any]) -> None:
    code = (
        "import time, sys, json; import torch; t = time.perf_counter(); import esper.kasmina; "
        "d = time.perf_counter() - t; print(json.dumps({'ms': d * 1e3, 'compiler': any(m.split('.')[:2] in "
        "(['torch', '_dynamo'], ['torch', '_inductor']) for m in sys.modules)}))"
    )
    runs = [json.loads(_run([sys.executable, "-c", code], dict(os.environ)).stdout) for _ in range(5)]
    results["P5"] = {
        "median_ms": statistics.median(r["ms"] for r in runs),
        "samples_ms": [r["ms"] for r in runs],
        "compiler_imported": any(r["compiler"] for r in runs),
    }
    assert not results["P5"]["compiler_imported"]


def test_p4_certify_catalog_cold_then_unchanged(
    results: dict[str, Any], out_dir: Path, bench_env: dict[str, str]
) -> None:
    for leftover in ("urza.db", "urza.db-wal", "urza.db-shm", "objects", "inductor-cache", "certify"):
        path = out_dir / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {k: v for k, v in bench_env.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--certify",
        "-q",
        "-p",
        "no:cacheprovider",
        "--certify-build-dir",
        str(out_dir / "certify"),
        "--benchmark-storage",
        str(out_dir / "benchmarks"),
    ]
    figures = {}
    for run in ("cold", "unchanged"):
        t0 = time.perf_counter()
        proc = _run(cmd, env)
        figures[run] = {
            "seconds": time.perf_counter() - t0,
            "exit_code": proc.returncode,
            "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:],
        }
        (out_dir / f"certify-{run}.log").write_text(proc.stdout + proc.stderr)
    results["P4"] = figures
    assert (out_dir / "urza.db").is_file()


@pytest.mark.parametrize("name", [bp.name for bp in BLUEPRINTS])
def test_p1_first_use(name: str, results: dict[str, Any], out_dir: Path, bench_env: dict[str, str]) -> None:
    bp = next(b for b in BLUEPRINTS if b.name == name)
    sizes = json.dumps(dict(bp.representative[0]))
    script = str(ROOT / "benchmarks" / "_first_use.py")
    base = [sys.executable, script]
    kasmina = [
        json.loads(
            _run(
                [*base, "kasmina", str(out_dir / "urza.db"), str(CATALOG), name, sizes], bench_env
            ).stdout.splitlines()[-1]
        )
        for _ in range(KASMINA_SAMPLES)
    ]
    cache = out_dir / "compile-cache" / name
    shutil.rmtree(cache, ignore_errors=True)
    env = {**bench_env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    cold = json.loads(_run([*base, "compile", "-", str(CATALOG), name, sizes], env).stdout.splitlines()[-1])
    warm = json.loads(_run([*base, "compile", "-", str(CATALOG), name, sizes], env).stdout.splitlines()[-1])
    median = statistics.median(k["ms"] for k in kasmina)
    results["P1"][name] = {
        "kasmina_ms": median,
        "kasmina_samples_ms": [k["ms"] for k in kasmina],
        "kasmina_path": kasmina[0]["path"],
        "kasmina_imported_compiler": any(k["compiler_imported"] for k in kasmina),
        "compile_cold_ms": cold["ms"],
        "compile_warm_ms": warm["ms"],
        "cold_over_kasmina": cold["ms"] / median,
        "warm_over_kasmina": warm["ms"] / median,
    }
    assert not results["P1"][name]["kasmina_imported_compiler"]


@pytest.fixture(scope="module")
def kernels(bench_urza: Path) -> dict[str, Any]:
    from esper.kasmina import Kasmina

    catalog = load_catalog([CATALOG])
    kasmina = Kasmina(bench_urza, catalog=catalog)
    return {bp.name: kasmina.load(bp.name) for bp in BLUEPRINTS}


@pytest.fixture(scope="module")
def default_kernels(bench_urza: Path) -> dict[tuple[str, str], Any]:
    """Per (blueprint, profile): the ``default`` variant's entry loaded alone, whatever its status."""
    from esper.kasmina import Kasmina
    from esper.urza import Urza

    catalog = load_catalog([CATALOG])
    kasmina = Kasmina(bench_urza, catalog=catalog)
    out = {}
    with Urza(bench_urza, readonly=True) as urza:
        for bp in BLUEPRINTS:
            for e in urza.entries(bp.name):
                if e.engine == "aoti" and e.variant == "default" and (bp.name, e.profile) not in out:
                    out[(bp.name, e.profile)] = kasmina.load_entry(bp.name, e.id)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def compiled_warm(out_dir: Path) -> dict[str, Any]:
    """``torch.compile(dynamic=True)`` per blueprint, with the Inductor cache P1 warmed for it."""
    return {}


# Fixed rounds, no early stop: every figure rests on the same evidence. Each round times 5 alternating pairs.
P2_ROUNDS = 15


# torch.compile itself warns about its own deprecated internals; that is not what this suite measures.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("name", "label"), CASES)
def test_p2_steady_state(
    name: str,
    label: str,
    kernels: dict[str, Any],
    default_kernels: dict[tuple[str, str], Any],
    compiled_warm: dict[str, Any],
    out_dir: Path,
    results: dict[str, Any],
) -> None:
    """Steady state per call against eager, interleaved: the Kasmina kernel (routed), the default variant
    alone (what Kasmina ran before variants and buckets) and warm ``torch.compile(dynamic=True)`` (P2b), each
    timed in rounds that alternate it with eager on the same inputs (:func:`~esper.certification.timing.compare`).
    A ratio is the median of per-round ratios, so a neighbour that slows one round slows both sides of it;
    ``low``/``high`` is its 95% interval and ``decision`` says whether the path is surely slower than eager
    (``loses``)."""
    from esper.certification.timing import compare

    bp = next(b for b in BLUEPRINTS if b.name == name)
    sizes = next(dict(r) for r in bp.representative if Blueprint.shape_label(r) == label)
    args = example_inputs(bp, sizes)
    module = bp.build().eval()
    profile = next(p for p, r in bp.profiles().items() if contains(r, sizes))
    if name not in compiled_warm:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out_dir / "compile-cache" / name)
        compiled_warm[name] = torch.compile(bp.build().eval(), dynamic=True)
    paths = {
        "kasmina": lambda: kernels[name](*args),
        "kasmina_default": lambda: default_kernels[(name, profile)](*args),
        "compile_warm": lambda: compiled_warm[name](*args),
    }
    row: dict[str, Any] = {"ratios": {}}
    eager_ms = []
    with torch.no_grad():
        for path, fn in paths.items():
            c = compare(
                fn,
                lambda: module(*args),
                rounds=P2_ROUNDS,
                min_rounds=P2_ROUNDS,
                max_rounds=P2_ROUNDS,
                calls=5,
                warmup=3,
            )
            row[path] = c.candidate_p50 * 1e3
            eager_ms.append(c.eager_p50 * 1e3)
            row["ratios"][path] = {"ratio": c.ratio, "low": c.low, "high": c.high, "decision": c.decision}
    row["eager"] = statistics.median(eager_ms)
    row["route"] = kernels[name].last_path
    results["P2"][f"{name}[{label}]"] = row


def test_p2_over_the_ranges(kernels: dict[str, Any], results: dict[str, Any]) -> None:
    """P2 at the representative shapes and over a grid of the declared ranges (the shapes a user sends), each
    point the Kasmina kernel against the bare module in interleaved rounds with a 95% interval
    (:mod:`benchmarks.grid`). Fails when P2 misses its target at either, or when any point is slower than the
    bare module by more than 5% with confidence. ``ESPER_BENCH_GRID_ROUNDS`` lowers the rounds for a smoke run."""
    from benchmarks import grid

    rounds = int(os.environ.get("ESPER_BENCH_GRID_ROUNDS", grid.ROUNDS))
    measured = [m for bp in BLUEPRINTS for m in grid.measure_blueprint(bp, kernels[bp.name], rounds=rounds)]
    results["P2grid"] = grid.report(measured)
    problems = results["P2grid"]["problems"]
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("name", [bp.name for bp in BLUEPRINTS])
def test_p3_guard_and_routing(benchmark: Any, name: str, kernels: dict[str, Any], results: dict[str, Any]) -> None:
    bp = next(b for b in BLUEPRINTS if b.name == name)
    args = example_inputs(bp, bp.representative[-1])
    kernel = kernels[name]
    route, why = kernel.select(args)
    benchmark(kernel.select, args)
    results["P3"][name] = {
        "us": benchmark.stats.stats.median * 1e6,
        "routes": len(kernel.routes),
        "accepted": route is not None,
        "why": why,
    }


@pytest.mark.parametrize("name", [bp.name for bp in BLUEPRINTS])
def test_sweep(name: str, kernels: dict[str, Any], bench_urza: Path, results: dict[str, Any]) -> None:
    """Latency against the batch dim for eager, every candidate and the routed kernel (for the plots)."""
    from esper.kasmina import Kasmina
    from esper.urza import Urza

    bp = next(b for b in BLUEPRINTS if b.name == name)
    dims = bp.dims
    dim = "batch" if "batch" in dims else next(iter(dims))
    lo, hi = dims[dim].min, dims[dim].max
    xs = sorted({x for x in (1, 2, 4, 8, 16, 32, 64, lo, hi) if lo <= x <= hi})
    base = dict(bp.representative[0])
    kasmina = Kasmina(bench_urza, catalog=load_catalog([CATALOG]))
    with Urza(bench_urza, readonly=True) as urza:
        candidates = [e for e in urza.entries(name) if e.engine == "aoti"]
    version = max((e.blueprint_version for e in candidates), default=bp.version)
    seen: set[tuple[str, str]] = set()
    loaded = []
    for e in candidates:  # newest first
        if e.blueprint_version == version and (e.profile, e.variant) not in seen:
            seen.add((e.profile, e.variant))
            loaded.append((e, kasmina.load_entry(name, e.id)))  # type: ignore[arg-type]
    module = bp.build().eval()
    series: dict[str, dict[int, float]] = {"eager": {}, "routed": {}}
    with torch.no_grad():
        for x in xs:
            args = example_inputs(bp, {**base, dim: x})
            # The same wrapper around every call measured, eager and compiled.
            series["eager"][x] = measure(functools.partial(module, *args), iters=20, max_seconds=0.3).p50_ms
            series["routed"][x] = measure(functools.partial(kernels[name], *args), iters=20, max_seconds=0.3).p50_ms
            for e, k in loaded:
                if k.check(*args) is None:
                    series.setdefault(e.variant, {})[x] = measure(
                        functools.partial(k, *args), iters=20, max_seconds=0.3
                    ).p50_ms
    edges = sorted({r[dim][0] for r in bp.profiles().values() if r[dim][0] > lo})
    results["sweep"][name] = {
        "dim": dim,
        "series": series,
        "bucket_edges": edges,
        "routes": [f"{r.entry.profile}->{r.path}:{r.entry.variant}" for r in kernels[name].routes],
    }


def test_floor(bench_urza: Path, results: dict[str, Any]) -> None:
    """The raw runner per call and Kasmina's overhead above it, per blueprint (benchmarks/floor.py)."""
    from benchmarks.floor import run_floor

    results["floor"] = run_floor(bench_urza, CATALOG, [], rounds=15, number=600)
    assert results["floor"]["blueprints"]


def test_levers(out_dir: Path, bench_env: dict[str, str], results: dict[str, Any]) -> None:
    """The lever study, written to ``levers.md``/``levers.json`` and summarized in ``perf.md``."""
    mode = os.environ.get("ESPER_BENCH_LEVERS", "quick")
    if mode == "off":
        pytest.skip("ESPER_BENCH_LEVERS=off")
    if mode == "reuse":  # the study was run on its own (python -m benchmarks.levers): report its figures
        results["levers"] = json.loads((out_dir / "levers.json").read_text())
        return
    cmd = [sys.executable, "-m", "benchmarks.levers", "--out", str(out_dir)] + (["--quick"] if mode != "full" else [])
    proc = _run(cmd, bench_env, timeout=6 * 3600)
    (out_dir / "levers.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results["levers"] = json.loads((out_dir / "levers.json").read_text())


def test_training_and_seeds(out_dir: Path, bench_env: dict[str, str], results: dict[str, Any]) -> None:
    """Training-step ratios (compiled / eager) and the cost of switching among 100 seeds every call."""
    target = out_dir / "training.json"
    target.unlink(missing_ok=True)
    script = str(ROOT / "benchmarks" / "seeds_and_training.py")
    proc = _run([sys.executable, script, "--json", str(target)], bench_env, timeout=3 * 3600)
    (out_dir / "training.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(target.read_text())
    results["training"] = data["routes"]
    results["seeds"] = data["seeds"]
