"""Input tensors for a blueprint: deterministic examples, and the value regimes certification draws."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from esper.blueprint import Blueprint, Input


@dataclass(frozen=True)
class Regime:
    """How input values are drawn: a magnitude, where exact zeros go, and a seed."""

    scale: float = 1.0
    zeros: str = "none"  # "none" | "some" | "all"
    seed: int = 0

    def __repr__(self) -> str:
        return f"Regime(scale={self.scale:g}, zeros={self.zeros!r}, seed={self.seed})"


def make_value(
    spec: Input,
    shape: tuple[int, ...],
    regime: Regime,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One input tensor in ``regime``, respecting the input's declared ``low``/``high``."""
    dtype = getattr(torch, spec.dtype)
    if not dtype.is_floating_point:
        low = int(spec.low if spec.low is not None else 0)
        high = int(spec.high if spec.high is not None else 2**15)
        return torch.randint(low, high + 1, shape, generator=generator).to(dtype=dtype, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32) * regime.scale
    if regime.zeros == "all":
        x.zero_()
    elif regime.zeros == "some":
        x[torch.rand(shape, generator=generator) < 0.5] = 0.0
    if spec.low is not None or spec.high is not None:
        x = x.clamp(spec.low, spec.high)
    return x.to(dtype=dtype, device=device)


def make_inputs(
    bp: Blueprint, dim_sizes: Mapping[str, int], regime: Regime, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, ...]:
    """Every input of ``bp`` at ``dim_sizes``, in ``regime``."""
    g = torch.Generator().manual_seed(regime.seed)
    shapes = bp.shapes(dim_sizes)
    return tuple(make_value(i, shapes[i.name], regime, g, device) for i in bp.inputs)


def example_inputs(
    bp: Blueprint, dim_sizes: Mapping[str, int], *, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Deterministic standard-normal example inputs for ``bp`` at ``dim_sizes``."""
    return make_inputs(bp, dim_sizes, Regime(seed=seed), device)
