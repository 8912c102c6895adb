"""Shape profiles: a blueprint's dynamic ranges split into buckets, each compiled and certified on its own.

A blueprint may declare ``buckets={"batch": [(1, 4), (5, 64)]}``: the buckets of a dim must tile its declared
range exactly, with no overlap and no gap, so that every accepted shape belongs to exactly one profile.
Profiles are the cartesian product of the bucketed dims; unbucketed dims keep their full range.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

DEFAULT_PROFILE = "default"
Ranges = dict[str, tuple[int, int]]


def bucket_problem(name: str, lo: int, hi: int, buckets: Sequence[tuple[int, int]]) -> str | None:
    """Why ``buckets`` do not tile ``[lo, hi]`` exactly (``None`` when they do)."""
    if not buckets:
        return f"dim {name!r}: an empty bucket list"
    ordered = sorted((int(a), int(b)) for a, b in buckets)
    for a, b in ordered:
        if a > b:
            return f"dim {name!r}: bucket ({a}, {b}) has min > max"
    if ordered[0][0] != lo:
        return f"dim {name!r}: buckets start at {ordered[0][0]}, the range starts at {lo} (a gap)"
    if ordered[-1][1] != hi:
        return f"dim {name!r}: buckets end at {ordered[-1][1]}, the range ends at {hi}"
    for (_, b1), (a2, _) in itertools.pairwise(ordered):
        if a2 <= b1:
            return f"dim {name!r}: buckets overlap at {a2}..{b1}"
        if a2 > b1 + 1:
            return f"dim {name!r}: buckets leave a gap at {b1 + 1}..{a2 - 1}"
    return None


def profile_name(ranges: Mapping[str, tuple[int, int]], bucketed: Sequence[str]) -> str:
    return ",".join(f"{d}={ranges[d][0]}-{ranges[d][1]}" for d in bucketed) or DEFAULT_PROFILE


def profiles(
    dims: Mapping[str, tuple[int, int]], buckets: Mapping[str, Sequence[tuple[int, int]]]
) -> dict[str, Ranges]:
    """Every profile's name and its ranges, in declaration order."""
    bucketed = [d for d in dims if d in buckets]
    choices = [sorted(buckets[d]) for d in bucketed]
    out: dict[str, Ranges] = {}
    for combo in itertools.product(*choices):
        ranges = dict(dims)
        ranges.update(dict(zip(bucketed, combo, strict=True)))
        out[profile_name(ranges, bucketed)] = ranges
    return out


def contains(ranges: Mapping[str, tuple[int, int]], sizes: Mapping[str, int]) -> bool:
    return all(ranges[d][0] <= s <= ranges[d][1] for d, s in sizes.items() if d in ranges)
