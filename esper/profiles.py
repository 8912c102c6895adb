"""Shape profiles: a blueprint's dynamic ranges split into buckets, each compiled and certified on its own.

A blueprint may declare ``buckets={"batch": [(1, 4), (5, 64)]}``: the buckets of a dim must tile its declared
range exactly, with no overlap and no gap, so that every accepted shape belongs to exactly one profile.
Profiles are the cartesian product of the bucketed dims; unbucketed dims keep their full range.

A *specialization* is another kind of profile: a bucket profile with one dim held at one exact size, for a dim
that the compiler cannot keep dynamic (export specializes it). It is named after its profile,
``default@seq=32`` or ``batch=1-4@seq=32``, and overlaps its profile on purpose: it serves exactly that size,
the profile's own route (eager, by evidence) every other. The bucket rule above is unchanged. Where several
dims must be held together (a training step whose compiled convolution serves one height and width), a
specialization holds each of them at one shape's own sizes: ``default@height=32,width=32``.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence

DEFAULT_PROFILE = "default"
#: Separates a specialization's profile from its exact sizes: ``default@seq=32``.
SPECIAL = "@"
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


def specialization_name(profile: str, sizes: Mapping[str, int]) -> str:
    """The name of ``profile`` with ``sizes`` held exact: ``"default@seq=32"``."""
    return profile + SPECIAL + ",".join(f"{d}={int(n)}" for d, n in sizes.items())


def split_profile(name: str) -> tuple[str, dict[str, int]]:
    """A profile name's bucket profile and exact sizes (none for a bucket profile): ``("default", {"seq": 32})``."""
    base, sep, rest = name.partition(SPECIAL)
    if not sep:
        return name, {}
    sizes = {}
    for part in rest.split(","):
        dim, _, size = part.partition("=")
        sizes[dim] = int(size)
    return base, sizes


def is_specialization(name: str) -> bool:
    """Whether ``name`` names a specialization (an exact-size profile) rather than a bucket profile."""
    return SPECIAL in name


def narrowed(ranges: Mapping[str, tuple[int, int]], sizes: Mapping[str, int]) -> Ranges | None:
    """``ranges`` with each dim of ``sizes`` held at its size; ``None`` when a size names no dim of ``ranges`` or
    lies outside its range."""
    out = dict(ranges)
    for dim, size in sizes.items():
        if dim not in out or not out[dim][0] <= size <= out[dim][1]:
            return None
        out[dim] = (size, size)
    return out


def specializations(profiles_: Mapping[str, Ranges], sizes: Mapping[str, Sequence[int]]) -> dict[str, Ranges]:
    """Every specialization of ``profiles_``: per profile (in order), per dim of ``sizes`` (in order), one per
    size inside the profile's range of that dim (ascending), each holding that one dim exact."""
    out: dict[str, Ranges] = {}
    for pname, ranges in profiles_.items():
        for dim, values in sizes.items():
            for n in sorted(set(values)):
                held = narrowed(ranges, {dim: n})
                if held is not None:
                    out[specialization_name(pname, {dim: n})] = held
    return out


def layouts(inputs: Sequence[Sequence[str | None]]) -> list[frozenset[str]]:
    """Per input (its dims' names in order, ``None`` for a fixed size), the named dims that share its strides:
    those after its leading dim (a contiguous tensor's strides are products of them; the leading dim enters
    none). A compiler that specializes a stride pins them together (see
    :func:`esper.tezzeret.training_compile.layout_dims`)."""
    return [frozenset(d for d in names[1:] if d is not None) for names in inputs]


def joint_specializations(
    profiles_: Mapping[str, Ranges], shapes: Sequence[Mapping[str, int]], together: Sequence[Collection[str]] = ()
) -> dict[str, Ranges]:
    """Every specialization of ``profiles_`` that holds several dims together: per profile (in order), per set of
    its dims of more than one size (fewest dims first), one per shape of ``shapes`` inside the profile, holding
    those dims at that shape's own sizes. Only the shapes' own combinations, never the cross product of their
    sizes: where a compiler cannot keep two dims dynamic, an artifact serves one pair of sizes. ``together``:
    groups of dims that are held all or none (e.g. :func:`layouts`); a set that holds part of one is left out,
    as no compile asks for it."""
    out: dict[str, Ranges] = {}
    for pname, ranges in profiles_.items():
        free = [d for d, (lo, hi) in ranges.items() if lo < hi]
        for k in range(1, len(free) + 1):
            for dims in itertools.combinations(free, k):
                if any(set(dims) & set(g) and not set(g) & set(free) <= set(dims) for g in together):
                    continue
                for shape in shapes:
                    if not contains(ranges, shape) or not all(d in shape for d in dims):
                        continue
                    sizes = {d: int(shape[d]) for d in dims}
                    held = narrowed(ranges, sizes)
                    if held is not None:
                        out.setdefault(specialization_name(pname, sizes), held)
    return out


def with_hot_sizes(
    representative: Sequence[Mapping[str, int]], hot: Mapping[str, Sequence[int]]
) -> list[dict[str, int]]:
    """The representative shapes, then for each hot size of a dim not among them each representative shape with
    that dim at the hot size: a shape to measure every hot size at (a specialization needs one)."""
    out = [dict(r) for r in representative]
    for dim, sizes in hot.items():
        for n in sorted(set(sizes)):
            for r in representative:
                shape = {**r, dim: n}
                if shape not in out:
                    out.append(shape)
    return out
