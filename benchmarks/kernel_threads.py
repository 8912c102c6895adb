"""What serializing a kernel's calls costs when 8 threads share it.

``CompiledPackage`` runs one call at a time (a lock around its single AOTInductor runner). This script
measures, for one certified blueprint at a few batch sizes:

- ``raw``: 1 thread calling the C++ runner directly (no lock), the floor;
- ``1 thread``: 1 thread through the kernel (guard check + uncontended lock);
- ``8 threads, shared``: 8 threads through one kernel, so one runner and one lock (what Kasmina does);
- ``8 threads, own``: 8 threads each with its own kernel (own runner, own lock): no serialization at all.

Each figure is wall time per call (total wall time / calls). The cost of serialization is ``shared`` over
``own``. Run: ``.venv/bin/python benchmarks/kernel_threads.py`` (compiles tests/fixtures/tiny's tiny_mlp into
a temporary Urza first, ~20 s) or ``--urza PATH --blueprints DIR --name NAME`` for a certified one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).parents[1]
THREADS = 8


def _compiled_tiny(folder: Path) -> Path:
    from esper.catalog import load_catalog
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    path = folder / "urza.db"
    with Urza(path, signer=None) as urza:
        entry = Tezzeret(urza).compile(load_catalog([ROOT / "tests" / "fixtures" / "tiny"]).get("tiny_mlp")).entry
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


def _per_call_us(fns: list[Any], calls_each: int) -> float:
    """Run each fn ``calls_each`` times, one thread per fn, started together; wall time per call in us."""
    barrier = threading.Barrier(len(fns) + 1)

    def work(fn: Any) -> None:
        barrier.wait()
        with torch.no_grad():  # grad mode is per thread
            for _ in range(calls_each):
                fn()

    threads = [threading.Thread(target=work, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) / (len(fns) * calls_each) * 1e6


def measure(urza: Path, blueprints: Path, name: str, batches: list[int], calls: int, repeats: int) -> dict[str, Any]:
    from esper.artifacts.runtime import CompiledPackage
    from esper.kasmina import COMPILED, Kasmina

    kasmina = Kasmina(urza, blueprint_paths=[blueprints])
    kernels = [kasmina.load(name) for _ in range(THREADS)]
    assert all(k.route == COMPILED for k in kernels), kernels[0].reason
    shared = kernels[0]
    package = next(r.package for r in shared.routes if r.package is not None)
    if not isinstance(package, CompiledPackage):
        raise SystemExit(f"{name}'s compiled route calls a {type(package).__name__}, not a loaded package")
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "calls_per_thread": calls, "batches": {}}
    for batch in batches:
        x = torch.randn(batch, *_feature_shape(shared))
        with torch.no_grad():
            shared(x)
            if shared.last_path != COMPILED:
                raise SystemExit(f"batch {batch} is outside the guards: {shared.check(x)}")
        variants: dict[str, list[Any]] = {
            "raw (no lock, 1 thread)": [lambda x=x: package._loader.run([x])],
            "1 thread": [lambda x=x: shared(x)],
            "8 threads, shared kernel": [lambda x=x: shared(x)] * THREADS,
            "8 threads, own kernels": [lambda x=x, k=k: k(x) for k in kernels],
        }
        # Interleaved repeats, so that load from other processes spreads over all four alike.
        samples: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(repeats):
            for label, fns in variants.items():
                samples[label].append(_per_call_us(fns, calls))
        figures = {label: statistics.median(s) for label, s in samples.items()}
        own, shared_us = figures["8 threads, own kernels"], figures["8 threads, shared kernel"]
        figures["serialization cost (shared / own)"] = shared_us / own
        out["batches"][f"batch={batch}"] = figures
    return out


def _feature_shape(kernel: Any) -> tuple[int, ...]:
    guards = kernel.routes[0].entry.guards
    return tuple(d.size for d in guards.inputs[0].dims[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urza", type=Path)
    parser.add_argument("--blueprints", type=Path, default=ROOT / "tests" / "fixtures" / "tiny")
    parser.add_argument("--name", default="tiny_mlp")
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--calls", type=int, default=500, help="calls per thread")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kernel-threads-") as tmp:
        urza = args.urza or _compiled_tiny(Path(tmp))
        result = measure(urza, args.blueprints, args.name, args.batch or [4, 32], args.calls, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
