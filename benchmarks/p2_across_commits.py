"""P2 before/after: one harness for two commits' Kasmina, at the same points.

    PYTHONPATH=<tree> .venv/bin/python -m benchmarks.p2_across_commits URZA TREE POINTS OUT

``benchmarks/grid.py`` needs today's certification library, which an old commit does not have; this script
needs only what every commit's Kasmina offers (``load_catalog``, ``Kasmina(urza, catalog=...).load``, the
blueprint's example inputs). Run it once with ``PYTHONPATH`` at the old tree (its Urza certified by its own
code) and once at the new one, back to back on a quiet machine: the same points (``POINTS``: a
``benchmarks.grid`` JSON, its representative and grid points), the same rounds.

Per point: the kernel against a freshly built bare module on the same inputs, ``ROUNDS`` interleaved rounds of
about ``ROUND_SECONDS`` each (order drawn per round), the median of the rounds' ratios. P2 is the geometric
mean per kind of point. Writes ``OUT`` (JSON: summary and points, with the path each point took).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROUNDS = 11
ROUND_SECONDS = 2e-3
MAX_CALLS = 200


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv: list[str]) -> int:
    from esper.catalog import load_catalog
    from esper.kasmina import Kasmina

    try:
        from esper.numerics.inputs import example_inputs
    except ImportError:  # commits before the numerics package
        from esper.inputs import example_inputs  # type: ignore[no-redef,import-not-found]

    urza, tree, points_file, out = (Path(a) for a in argv)
    catalog = load_catalog([tree / "blueprints"])
    kasmina = Kasmina(urza, catalog=catalog)
    rng = random.Random(0)
    loaded: dict[str, tuple[Any, Any, Any]] = {}
    results = []
    with torch.no_grad():
        for point in json.loads(points_file.read_text())["points"]:
            name = point["blueprint"]
            if name not in loaded:
                bp = catalog.select([name])[0]
                loaded[name] = (bp, kasmina.load(name), bp.build().eval())
            bp, kernel, bare = loaded[name]
            sizes = {k: int(v) for k, v in (kv.split("=") for kv in point["label"].split(","))}
            args = tuple(example_inputs(bp, sizes))
            for _ in range(3):
                kernel(*args)
                bare(*args)
            t0 = time.perf_counter()
            bare(*args)
            calls = max(1, min(MAX_CALLS, int(ROUND_SECONDS / max(time.perf_counter() - t0, 1e-6))))
            ratios = []
            for _ in range(ROUNDS):
                seconds = {}
                for side in rng.sample(["kernel", "bare"], 2):
                    fn = kernel if side == "kernel" else bare
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn(*args)
                    seconds[side] = time.perf_counter() - t0
                ratios.append(seconds["kernel"] / seconds["bare"])
            results.append(
                {
                    "blueprint": name,
                    "kind": point["kind"],
                    "label": point["label"],
                    "ratio": statistics.median(ratios),
                    "path": kernel.last_path,
                }
            )
    kinds = sorted({r["kind"] for r in results})
    summary = {k: geomean([r["ratio"] for r in results if r["kind"] == k]) for k in kinds}
    out.write_text(json.dumps({"summary": summary, "points": results}, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
