"""Input tensors for one parity :class:`~esper.coverage.ValueCase`: the regimes of
:data:`esper.coverage.VALUE_REGIMES`, including magnitudes mixed inside one tensor.

``unit``, ``tiny`` (1e-3), ``large`` (1e3), ``some-zeros`` and ``all-zeros`` are the regimes
:class:`esper.inputs.Regime` already draws; ``mixed`` is new: each element's magnitude is drawn from
{1e-3, 1, 1e3}, with some exact zeros, so that a kernel whose error depends on the largest value in a
reduction (a lower-precision accumulation, a badly scaled softmax) meets small values beside large ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from esper.blueprint import Blueprint, Input
from esper.coverage import VALUE_REGIMES, ValueCase
from esper.inputs import Regime, make_value

MIXED_SCALES = (1e-3, 1.0, 1e3)
_AS_REGIME = {
    "unit": Regime(),
    "tiny": Regime(scale=1e-3),
    "large": Regime(scale=1e3),
    "some-zeros": Regime(zeros="some"),
    "all-zeros": Regime(zeros="all"),
}


def mixed(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard-normal float32 values, each scaled by one of :data:`MIXED_SCALES` at random, a tenth of
    them exact zeros."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    scales = torch.tensor(MIXED_SCALES, dtype=torch.float32)
    x = x * scales[torch.randint(0, len(MIXED_SCALES), shape, generator=generator)]
    return x.masked_fill(torch.rand(shape, generator=generator) < 0.1, 0.0)


def make_case_value(
    spec: Input, shape: tuple[int, ...], case: ValueCase, generator: torch.Generator, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """One input tensor for ``case``, respecting the input's dtype and declared ``low``/``high``."""
    if case.regime not in VALUE_REGIMES:
        raise ValueError(f"unknown value regime {case.regime!r}; known: {', '.join(VALUE_REGIMES)}")
    dtype = getattr(torch, spec.dtype)
    if case.regime != "mixed" or not dtype.is_floating_point:
        regime = _AS_REGIME.get(case.regime, Regime())
        return make_value(spec, shape, Regime(regime.scale, regime.zeros, case.seed), generator, device)
    x = mixed(shape, generator)
    if spec.low is not None or spec.high is not None:
        x = x.clamp(spec.low, spec.high)
    return x.to(dtype=dtype, device=device)


def make_case_inputs(
    bp: Blueprint, sizes: Mapping[str, int], case: ValueCase, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, ...]:
    """Every input of ``bp`` at ``sizes`` for ``case`` (seeded by ``case.seed`` and the regime, so two
    regimes with the same seed draw different values)."""
    if case.regime not in VALUE_REGIMES:
        raise ValueError(f"unknown value regime {case.regime!r}; known: {', '.join(VALUE_REGIMES)}")
    g = torch.Generator().manual_seed(case.seed * len(VALUE_REGIMES) + VALUE_REGIMES.index(case.regime))
    shapes = bp.shapes(sizes)
    return tuple(make_case_value(i, shapes[i.name], case, g, device) for i in bp.inputs)
