"""The inputs a candidate's guards must refuse: a pure function of its guard schema and a base shape.

Every kind of artifact is checked with the same cases: each dynamic dim just outside its range, a wrong dtype,
a wrong rank, and each fixed dim off by one. Each case differs from an accepted input in exactly the one
property it names, on the same device: a case that also changed the device would test the device check, not
the dim (the inference copy of this builder once did, on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from esper.artifacts.guards import GuardSchema

MakeInputs = Callable[[Mapping[str, int]], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class RefusedCase:
    """Inputs the guards must refuse, and what is wrong with them."""

    what: str
    args: tuple[torch.Tensor, ...]


def refused_cases(guards: GuardSchema, base_sizes: Mapping[str, int], make: MakeInputs) -> list[RefusedCase]:
    """Every case the guards must refuse, built around ``make(base_sizes)`` (an accepted input).

    ``make`` turns dim sizes into inputs (on the certification's device). Sizes below zero are skipped: no
    tensor has them.
    """
    cases: list[RefusedCase] = []
    for name, (lo, hi) in guards.dim_ranges().items():
        for size, where in ((lo - 1, "below"), (hi + 1, "above")):
            if size >= 0:
                cases.append(RefusedCase(f"{name}={size} ({where} range)", make({**base_sizes, name: size})))
    base = make(base_sizes)
    for k, g in enumerate(guards.inputs):
        wrong = torch.float64 if base[k].dtype != torch.float64 else torch.float32
        cases.append(RefusedCase(f"{g.name} as {wrong}", _replace(base, k, base[k].to(wrong))))
        cases.append(RefusedCase(f"{g.name} with an extra dim", _replace(base, k, base[k].unsqueeze(0))))
        for d, dim in enumerate(g.dims):
            if not dim.dynamic:
                shape = list(base[k].shape)
                shape[d] += 1
                # new_zeros keeps the dtype and the device: only the named dim differs.
                cases.append(RefusedCase(f"{g.name} dim {d} = {shape[d]}", _replace(base, k, base[k].new_zeros(shape))))
    return cases


def _replace(args: tuple[torch.Tensor, ...], k: int, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*args[:k], value, *args[k + 1 :])
