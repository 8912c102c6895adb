"""What a blueprint's certification checks, per artifact kind: pure functions of the declaration.

The generated module lists these values and the certification run iterates over them, so both read them from
here. A *candidate* is one shape profile compiled under one Inductor variant, named ``"profile/variant"``; which
candidates a kind has is its :class:`~esper.artifacts.kinds.KindSpec`'s rule, the one Tezzeret compiles by.
Inference competes every profile under every variant the blueprint allows, then every exact-size
specialization of each profile (a dim held at a representative or hot size, see :mod:`esper.profiles`): one is
compiled only where its profile's export could not keep that dim dynamic, and is skipped otherwise; the training
artifact is one candidate, the whole declared range under the default variant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
# seed, the regimes rotating; pairwise sizes of every two dims thinned to PAIR_BUDGET shapes, PAIR_SEEDS each.
PARITY_SEEDS = 1
EXTRA_SEEDS = 2
SWEEP_SEEDS = 1
PAIR_SEEDS = 1
EVERY_SIZE_CAP = coverage.EVERY_SIZE_CAP
PAIR_BUDGET = 48


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
    return cases
