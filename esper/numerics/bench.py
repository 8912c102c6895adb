"""A small wall-clock latency measurement (p50/p95), for compile-time evidence and Kasmina-free scripts.

Certification's benchmarks use pytest-benchmark; this is what Tezzeret records right after compiling.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``samples`` by linear interpolation."""
    if len(samples) == 1:
        return samples[0]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[max(0, min(98, round(q * 100) - 1))]


def measure(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 30, max_seconds: float = 1.0) -> Latency:
    """Run ``fn`` ``warmup`` times, then up to ``iters`` timed times (stopping after ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(samples) < iters and (len(samples) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return Latency(p50_ms=percentile(samples, 0.5), p95_ms=percentile(samples, 0.95), n=len(samples))
