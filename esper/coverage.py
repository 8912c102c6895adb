"""Which sizes of a shape profile must be tried: the edges every check includes.

Pure functions of the dim ranges (no hypothesis, no torch), shared by Tezzeret's compile-time checks and
certification's strategies.
"""

from __future__ import annotations

Ranges = dict[str, tuple[int, int]]


def largest_prime_between(lo: int, hi: int) -> int | None:
    """The largest prime strictly between ``lo`` and ``hi`` (``None`` if there is none)."""
    for n in range(hi - 1, lo, -1):
        if n > 2 and all(n % d for d in range(2, int(n**0.5) + 1)):
            return n
    return None


def edge_sizes(ranges: Ranges) -> list[dict[str, int]]:
    """Shapes that must always be tried: every dim at its min, every dim at its max, and every dim at a
    prime strictly inside its range (an odd size where no prime fits), then min/max mixed."""
    if not ranges:
        return [{}]
    out = [{n: lo for n, (lo, _) in ranges.items()}, {n: hi for n, (_, hi) in ranges.items()}]
    inner = {}
    for n, (lo, hi) in ranges.items():
        odd = next((k for k in range(hi - 1, lo, -1) if k % 2), None)
        inner[n] = largest_prime_between(lo, hi) or odd or lo
    out.append(inner)
    if len(ranges) > 1:
        names = list(ranges)
        out.append({n: (ranges[n][0] if i == 0 else ranges[n][1]) for i, n in enumerate(names)})
    unique: list[dict[str, int]] = []
    for sizes in out:
        if sizes not in unique:
            unique.append(sizes)
    return unique
