"""torch.export of a blueprint with its declared dynamic dims, and the guard schema read back from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.export import Dim, ExportedProgram, export

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.blueprint import Blueprint
from esper.numerics.inputs import example_inputs


class GuardMismatchError(RuntimeError):
    """The exported program's guards differ from the declared dims (export narrowed or specialized one)."""


def export_sizes(bp: Blueprint, ranges: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Example sizes for export: a representative shape inside ``ranges`` if one is, else a mid value.

    Sizes 0 and 1 are avoided where the range allows: export specializes on them.
    """
    for rep in bp.representative:
        if all(lo <= rep[n] <= hi and (rep[n] >= 2 or hi < 2) for n, (lo, hi) in ranges.items()):
            return dict(rep)
    return {n: max(lo, min(hi, max(2, (lo + hi) // 2))) for n, (lo, hi) in ranges.items()}


def export_blueprint(
    bp: Blueprint,
    module: torch.nn.Module,
    *,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    device: str | torch.device = "cpu",
) -> ExportedProgram:
    """Export ``module`` with every declared dynamic dim as a named ``Dim`` over ``ranges`` (default: declared);
    a dim whose range is one size (a specialization's) is exported static, at that size."""
    ranges = dict(ranges or {n: (d.min, d.max) for n, d in bp.dims.items()})
    dims = {n: Dim(n, min=lo, max=hi) for n, (lo, hi) in ranges.items() if lo < hi}
    dynamic_shapes = {
        i.name: {k: dims[d.name] for k, d in enumerate(i.shape) if not isinstance(d, int) and d.name in dims} or None
        for i in bp.inputs
    }
    args = example_inputs(bp, export_sizes(bp, ranges), device=device)
    # The module's forward may name its arguments differently from the declaration; pass them positionally
    # and key the dynamic shapes by position.
    return export(module, args, dynamic_shapes=tuple(dynamic_shapes.values()), strict=False)


def declared_guards(bp: Blueprint, ranges: Mapping[str, tuple[int, int]], device: str) -> GuardSchema:
    """The guard schema ``bp`` declares over ``ranges``, without an export: what an eager route over a profile
    whose export failed accepts."""

    def dim(d: int | Any) -> DimGuard:
        if isinstance(d, int):
            return DimGuard(size=d)
        lo, hi = ranges[d.name]
        return DimGuard(name=d.name, min=lo, max=hi)

    inputs = tuple(InputGuard(i.name, i.dtype, tuple(dim(d) for d in i.shape)) for i in bp.inputs)
    return GuardSchema(inputs=inputs, device=device)


def guards_from_export(
    ep: ExportedProgram, bp: Blueprint, *, ranges: Mapping[str, tuple[int, int]] | None = None
) -> GuardSchema:
    """Read the guard schema from ``ep``'s user-input placeholders and range constraints.

    Each input dim is fixed or a symbol; a symbol's range comes from the export (the ground truth of what
    the compiled code was specialized for) and must equal the declared (or bucket) range.
    """
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != len(bp.inputs):
        raise GuardMismatchError(f"export has {len(user_inputs)} user inputs, blueprint declares {len(bp.inputs)}")
    return guards_from_values(ep, bp, [placeholders[name].meta["val"] for name in user_inputs], ranges=ranges)


def guards_from_values(
    ep: ExportedProgram, bp: Blueprint, values: list[Any], *, ranges: Mapping[str, tuple[int, int]] | None = None
) -> GuardSchema:
    """The guard schema of ``bp``'s inputs given their (fake) values in ``ep``, in declaration order."""
    expected = dict(ranges or {n: (d.min, d.max) for n, d in bp.dims.items()})
    guards: list[InputGuard] = []
    device = "cpu"
    for spec, val in zip(bp.inputs, values, strict=True):
        device = val.device.type
        dims: list[DimGuard] = []
        for k, (declared, size) in enumerate(zip(spec.shape, val.shape, strict=True)):
            if isinstance(declared, int):
                if not isinstance(size, int) or size != declared:
                    raise GuardMismatchError(f"input {spec.name!r} dim {k}: export has {size}, declared {declared}")
                dims.append(DimGuard(size=declared))
                continue
            if isinstance(size, int) and tuple(expected[declared.name]) == (size, size):
                # Held exact on purpose (a specialization): still named, so the guards check it like a range.
                dims.append(DimGuard(name=declared.name, min=size, max=size))
                continue
            if isinstance(size, int):
                raise GuardMismatchError(
                    f"input {spec.name!r} dim {k} ({declared.name}): export specialized it to {size}"
                )
            vr = ep.range_constraints[size.node.expr]
            lo, hi = int(vr.lower), int(vr.upper)
            if (lo, hi) != tuple(expected[declared.name]):
                raise GuardMismatchError(
                    f"input {spec.name!r} dim {k} ({declared.name}): export range [{lo}, {hi}] != declared "
                    f"{list(expected[declared.name])}"
                )
            dims.append(DimGuard(name=declared.name, min=lo, max=hi))
        guards.append(InputGuard(spec.name, spec.dtype, tuple(dims)))
    return GuardSchema(
        inputs=tuple(guards),
        device=device,
        range_constraints={str(k): f"[{v.lower}, {v.upper}]" for k, v in ep.range_constraints.items()},
    )
