"""Input tensors for a blueprint: the one generator behind deterministic examples, hypothesis-drawn regimes
and the parity cases of :data:`esper.numerics.coverage.VALUE_REGIMES`.

A :class:`Regime` says how values are drawn (a magnitude, where exact zeros go, whether magnitudes are mixed
inside one tensor, and the seed); :func:`make_inputs` turns it into tensors with a private seeded generator.
``mixed`` draws each element's magnitude from {1e-3, 1, 1e3}, with some exact zeros, so that a kernel whose
error depends on the largest value in a reduction (a lower-precision accumulation, a badly scaled softmax)
meets small values beside large ones. ``nonfinite`` puts NaN, +inf and -inf at seeded positions of every
floating input (:func:`place_nonfinite_at`), the rest unit-scale: a kernel must let them through where eager
and the float64 reference do (:func:`esper.numerics.parity.nonfinite_breach`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from esper.blueprint import Blueprint, Input
from esper.numerics.coverage import VALUE_REGIMES, ValueCase

__all__ = [
    "MIXED_SCALES",
    "REGIMES",
    "Regime",
    "case_regime",
    "example_inputs",
    "make_inputs",
    "make_value",
    "place_nonfinite_at",
]

MIXED_SCALES = (1e-3, 1.0, 1e3)


@dataclass(frozen=True)
class Regime:
    """How input values are drawn: a magnitude, where exact zeros go, mixed magnitudes, and a seed."""

    scale: float = 1.0
    zeros: str = "none"  # "none" | "some" | "all"
    seed: int = 0
    mixed: bool = False
    nonfinite: int = 0  # NaN, +inf and -inf: this many of each per floating tensor (see place_nonfinite_at)

    def __repr__(self) -> str:
        mixed = ", mixed" if self.mixed else ""
        nonfinite = f", nonfinite={self.nonfinite}" if self.nonfinite else ""
        return f"Regime(scale={self.scale:g}, zeros={self.zeros!r}, seed={self.seed}{mixed}{nonfinite})"


# The named regimes of a parity case (their seed is the case's: see case_regime).
REGIMES: dict[str, Regime] = {
    "unit": Regime(),
    "tiny": Regime(scale=1e-3),
    "large": Regime(scale=1e3),
    "some-zeros": Regime(zeros="some"),
    "all-zeros": Regime(zeros="all"),
    "mixed": Regime(mixed=True),
    "nonfinite": Regime(nonfinite=1),
}
assert tuple(REGIMES) == VALUE_REGIMES


# The first regimes keep the seeds they were drawn with before later ones (nonfinite) joined, so adding a
# regime changes no other regime's values; later regimes draw from seeds of their own, above LATER_SEEDS.
SEEDED_BEFORE = 6
LATER_SEEDS = 1 << 32


def case_regime(case: ValueCase) -> Regime:
    """The regime a parity case draws from, seeded by the case's seed and its regime's name (so two regimes
    with the same seed draw different values)."""
    if case.regime not in REGIMES:
        raise ValueError(f"unknown value regime {case.regime!r}; known: {', '.join(VALUE_REGIMES)}")
    k = VALUE_REGIMES.index(case.regime)
    if k < SEEDED_BEFORE:
        return replace(REGIMES[case.regime], seed=case.seed * SEEDED_BEFORE + k)
    return replace(REGIMES[case.regime], seed=LATER_SEEDS + case.seed * len(VALUE_REGIMES) + k)


def place_nonfinite_at(t: torch.Tensor, per_value: int, generator: torch.Generator) -> torch.Tensor:
    """Write NaN, +inf and -inf into ``t`` (a contiguous floating tensor, in place) at distinct positions drawn
    from ``generator``: ``per_value`` elements of each, at most a third of the tensor each (one of each in a
    tensor of fewer than three elements, as far as it goes). Returns ``t``."""
    flat = t.view(-1)
    if flat.numel() == 0 or per_value <= 0:
        return t
    k = min(per_value, max(flat.numel() // 3, 1))
    where = torch.randperm(flat.numel(), generator=generator)[: 3 * k]
    for j, value in enumerate((math.nan, math.inf, -math.inf)):
        flat[where[j * k : (j + 1) * k]] = value
    return t


def make_value(
    spec: Input,
    shape: tuple[int, ...],
    regime: Regime,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One input tensor in ``regime``, respecting the input's dtype and declared ``low``/``high``."""
    dtype = getattr(torch, spec.dtype)
    if not dtype.is_floating_point:
        low = int(spec.low if spec.low is not None else 0)
        high = int(spec.high if spec.high is not None else 2**15)
        return torch.randint(low, high + 1, shape, generator=generator).to(dtype=dtype, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    if regime.mixed:
        scales = torch.tensor(MIXED_SCALES, dtype=torch.float32)
        x = x * scales[torch.randint(0, len(MIXED_SCALES), shape, generator=generator)]
        x = x.masked_fill(torch.rand(shape, generator=generator) < 0.1, 0.0)
    else:
        x = x * regime.scale
        if regime.zeros == "all":
            x.zero_()
        elif regime.zeros == "some":
            x.masked_fill_(torch.rand(shape, generator=generator) < 0.5, 0.0)
    if spec.low is not None or spec.high is not None:
        x = x.clamp(spec.low, spec.high)
    if regime.nonfinite:
        # After the clamp: the declared range bounds the finite values; NaN and inf are what a diverged host
        # hands over whatever the declaration says.
        place_nonfinite_at(x, regime.nonfinite, generator)
    return x.to(dtype=dtype, device=device)


def make_inputs(
    bp: Blueprint, dim_sizes: Mapping[str, int], regime: Regime | ValueCase, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, ...]:
    """Every input of ``bp`` at ``dim_sizes``, in ``regime`` (or a parity case's regime)."""
    if isinstance(regime, ValueCase):
        regime = case_regime(regime)
    g = torch.Generator().manual_seed(regime.seed)
    shapes = bp.shapes(dim_sizes)
    return tuple(make_value(i, shapes[i.name], regime, g, device) for i in bp.inputs)


def example_inputs(
    bp: Blueprint, dim_sizes: Mapping[str, int], *, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Deterministic standard-normal example inputs for ``bp`` at ``dim_sizes``."""
    return make_inputs(bp, dim_sizes, Regime(seed=seed), device)
