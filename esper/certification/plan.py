"""What a blueprint's certification checks, per artifact kind: pure functions of the declaration.

The generated module lists these values and the certification run iterates over them, so both read them from
here. A *candidate* is one shape profile compiled under one Inductor variant, named ``"profile/variant"``; which
candidates a kind has is its :class:`~esper.artifacts.kinds.KindSpec`'s rule, the one Tezzeret compiles by.
Inference competes every profile under every variant the blueprint allows, then every exact-size
specialization of each profile (a dim held at a representative or hot size, see :mod:`esper.profiles`): one is
compiled only where its profile's export could not keep that dim dynamic, and is skipped otherwise. The training
artifact is the whole declared range under the default variant, then its specializations: dims held together at
a measured shape's own sizes, compiled only where the compiled step cannot keep exactly those dims dynamic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from esper.artifacts.kinds import ArtifactKind, spec
from esper.blueprint import Blueprint
from esper.numerics import coverage
from esper.profiles import contains

Ranges = Mapping[str, tuple[int, int]]


def profiles(bp: Blueprint, artifact: ArtifactKind) -> dict[str, dict[str, tuple[int, int]]]:
    """The shape profiles certified for ``artifact``, each with its dim ranges (:meth:`KindSpec.profiles`)."""
    return spec(artifact).profiles(bp)


def variants(bp: Blueprint, artifact: ArtifactKind) -> tuple[str, ...]:
    """The Inductor variants that compete for ``artifact``, in preference order."""
    return spec(artifact).variant_names(bp)


def candidate_ids(bp: Blueprint, artifact: ArtifactKind) -> list[str]:
    """Every candidate of ``artifact``, ``"profile/variant"``, profiles in declaration order: the candidates
    Tezzeret compiles (:meth:`KindSpec.candidates`)."""
    return [c.id for c in spec(artifact).candidates(bp)]


def shape_labels(bp: Blueprint) -> dict[str, dict[str, int]]:
    """The representative shapes by label (``"batch=8"``), in declaration order, then the shapes that measure
    its hot sizes (:meth:`~esper.blueprint.Blueprint.measured_shapes`)."""
    return {Blueprint.shape_label(r): dict(r) for r in bp.measured_shapes()}


def labels_in(bp: Blueprint, ranges: Ranges) -> list[str]:
    """The labels of the representative shapes inside ``ranges``."""
    return [label for label, sizes in shape_labels(bp).items() if contains(ranges, sizes)]


def latency_cases(bp: Blueprint, artifact: ArtifactKind) -> list[tuple[str, str]]:
    """``(candidate, shape label)`` pairs to time against eager (interleaved, in the same test): each
    candidate at the representative shapes inside its profile."""
    ranges = profiles(bp, artifact)
    return [(c.id, label) for c in spec(artifact).candidates(bp) for label in labels_in(bp, ranges[c.profile])]


# The planned parity cases of a profile (esper.numerics.coverage.plan), sized so that the whole catalog certifies cold
# within 10 minutes on 2 cores (compiling takes most of it): every representative and edge shape under every
# value regime, PARITY_SEEDS seed(s); EXTRA_SEEDS more seeds of every regime at the smallest representative
# shape (the cheapest; the largest shapes cost most: at conv_bn_relu's 32x64x64 a float64 training step is
# most of the profile's parity time); every size of each dim (up to EVERY_SIZE_CAP values) with SWEEP_SEEDS
# seed, the regimes rotating; pairwise sizes of every two dims thinned to PAIR_BUDGET shapes, PAIR_SEEDS each;
# then the shapes of the profile's covering design (coverage.shape_design: every pair of values of every two
# dims where that fits DESIGN_BUDGET shapes, else every residue of each dim and of the products of dims modulo
# coverage.INDUCTOR_MODULI, with the edges) that the cases above do not already hold, DESIGN_SEEDS each.
PARITY_SEEDS = 1
EXTRA_SEEDS = 2
SWEEP_SEEDS = 1
PAIR_SEEDS = 1
EVERY_SIZE_CAP = coverage.EVERY_SIZE_CAP
PAIR_BUDGET = 48
DESIGN_SEEDS = 1
DESIGN_BUDGET = PAIR_BUDGET


def parity_cases(bp: Blueprint, ranges: Ranges) -> list[coverage.Case]:
    """The deterministic parity cases of one profile (see the constants above)."""
    cases = coverage.plan(
        dict(ranges),
        bp.representative,
        seeds=PARITY_SEEDS,
        sweep_seeds=SWEEP_SEEDS,
        pair_seeds=PAIR_SEEDS,
        cap=EVERY_SIZE_CAP,
        budget=PAIR_BUDGET,
    )
    inside = [dict(r) for r in bp.representative if contains(ranges, r)]
    if inside:
        smallest = {n: int(v) for n, v in min(inside, key=lambda r: math.prod(r.values())).items() if n in ranges}
        cases += [
            coverage.Case(smallest, coverage.ValueCase(regime, PARITY_SEEDS + k))
            for k in range(EXTRA_SEEDS)
            for regime in coverage.VALUE_REGIMES
        ]
    have = {tuple(sorted(c.sizes.items())) for c in cases}
    design = [s for s in design_shapes(ranges) if tuple(sorted(s.items())) not in have]
    regimes = coverage.VALUE_REGIMES
    cases += [
        coverage.Case(s, coverage.ValueCase(regimes[(i * DESIGN_SEEDS + k) % len(regimes)], k))
        for i, s in enumerate(design)
        for k in range(DESIGN_SEEDS)
    ]
    return cases


def design_shapes(ranges: Ranges) -> list[dict[str, int]]:
    """The shapes of the profile's covering design (:func:`esper.numerics.coverage.shape_design`)."""
    return coverage.shape_design(dict(ranges), budget=DESIGN_BUDGET, cap=EVERY_SIZE_CAP)[0]


def shape_coverage(cases: Sequence[coverage.Case], ranges: Ranges) -> coverage.ShapeCoverage:
    """What a profile's planned parity ``cases`` cover of the combinations compiled loops iterate over: the
    value pairs of every two dims and the residues of each dim and of the products of dims, modulo each of
    :data:`esper.numerics.coverage.INDUCTOR_MODULI`, covered out of all there are (``method``: the design's)."""
    _, design = coverage.shape_design(dict(ranges), budget=DESIGN_BUDGET, cap=EVERY_SIZE_CAP)
    shapes = [c.sizes for c in cases]
    return coverage.shape_coverage(shapes, dict(ranges), method=design.method)


# A seed's weights are certified on WEIGHT_CASES of the planned cases per weight set beyond the blueprint's own
# (esper.certification.contract.weight_sets), in WEIGHT_REGIMES: the weights are what varies, so the inputs keep
# moderate magnitudes (weights ten or a hundred times larger meeting inputs of 1e3 make an ill-conditioned
# computation of any module, not a fault of its compiled code).
WEIGHT_CASES = 3
WEIGHT_REGIMES = ("unit", "some-zeros", "tiny")
# Repeated calls: REPEATED_SHAPES shapes of the profile, each with the blueprint's weights and (where a seed
# can hold other weights) REPEATED_WEIGHTS other weight sets, alternated over REPEATED_ROUNDS rounds.
REPEATED_SHAPES = 3
REPEATED_WEIGHTS = 1
REPEATED_ROUNDS = 3


def spread_cases(cases: Sequence[coverage.Case], count: int, regimes: Sequence[str]) -> list[coverage.Case]:
    """``count`` of ``cases`` in ``regimes``, each of another shape and (while the regimes last) another regime,
    spread over the lower half of their cost (elements): the cheapest, then ones a quarter and half way up."""
    order = sorted(
        (c for c in cases if c.values.regime in regimes), key=lambda c: (math.prod(c.sizes.values()), str(c))
    )
    picked: list[coverage.Case] = []
    for q in range(count):
        start = (len(order) - 1) * q // (2 * max(count - 1, 1))
        other_shape = [c for c in order[start:] + order[:start] if all(c.sizes != p.sizes for p in picked)]
        other_regime = [c for c in other_shape if all(c.values.regime != p.values.regime for p in picked)]
        if other_shape:
            picked.append((other_regime or other_shape)[0])
    return picked


def weight_cases(bp: Blueprint, ranges: Ranges, cases: Sequence[coverage.Case]) -> list[coverage.Case]:
    """The planned ``cases`` of a profile a weight set beyond the blueprint's own is certified on (see
    :data:`WEIGHT_CASES`): shapes no smaller in any dim than the smallest representative shape inside the
    profile. The edges of the ranges are parity's, at the blueprint's weights: there a statistic over a batch
    of two (a BatchNorm's in training) of values that a grown bias shifts far from zero cancels, an
    ill-conditioned computation whose float32 error no single eager run measures."""
    inside = [r for r in bp.representative if contains(ranges, r)]
    if inside:
        floor = min(inside, key=lambda r: math.prod(int(r[n]) for n in ranges))
        cases = [c for c in cases if all(c.sizes[n] >= int(floor[n]) for n in ranges)] or list(cases)
    return spread_cases(cases, WEIGHT_CASES, WEIGHT_REGIMES)


def repeated_shapes(bp: Blueprint, ranges: Ranges, cases: Sequence[coverage.Case]) -> list[dict[str, int]]:
    """The shapes a repeated-call schedule alternates, :data:`REPEATED_SHAPES` in all: the smallest
    representative shape inside the profile, then planned shapes of other sizes (spread over the lower half of
    their cost: each call is judged, and a float64 reference of a large shape costs most of a case) of the
    profile's planned ``cases``."""
    inside = [{n: int(v) for n, v in r.items() if n in ranges} for r in bp.representative if contains(ranges, r)]
    shapes = [min(inside, key=lambda r: math.prod(r.values()))] if inside else []
    for c in spread_cases(cases, REPEATED_SHAPES, coverage.VALUE_REGIMES):
        if dict(c.sizes) not in shapes:
            shapes.append(dict(c.sizes))
    return shapes[:REPEATED_SHAPES]
