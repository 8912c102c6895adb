"""Planning a training artifact from the traced forward and backward graphs: a pure function, no Inductor.

:func:`plan_artifact` reads a :class:`~esper.tezzeret.joint.JointGraphs` and the blueprint and decides, as plain
data, what the two packages of the training artifact look like:

- which forward graph outputs the forward package returns: the buffers' new values, the outputs, and each
  activation the backward needs once (an activation that is a forward input is passed again, not returned);
- where each saved activation comes from (``("forward_input", i)`` or ``("forward_output", j)``);
- the backward package's inputs: a zero-size *carrier* whose dims are the dynamic sizes (when the backward
  needs sizes), then the saved activations and the upstream gradients in graph order, and how the backward
  graph's own arguments (sizes computed from the carrier, tensors by position) are made from them;
- which dims of each package input are dynamic, by declared dim name (a size linear in one declared dim, such
  as ``4*batch`` for batch times heads, is a :class:`Linear` derived dim; other compound sizes such as
  ``batch*seq`` are :data:`COMPOUND`: export chooses);
- the manifest's slots (see :mod:`esper.artifacts.training_manifest`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from esper.blueprint import Blueprint
from esper.blueprint import Dim as DeclaredDim
from esper.tezzeret.export import export_sizes
from esper.tezzeret.joint import JointGraphs, JointUnsupported, Slot

# A dynamic dim that is no declared dim but an expression of them (``batch*seq``): exported as ``Dim.AUTO``.
COMPOUND = "*"


@dataclass(frozen=True)
class Linear:
    """A dynamic size ``scale * dim + offset`` of one declared dim (``4*batch``: attention scores flattened over
    batch and heads). Exported as that derived dim: export refuses ``Dim.AUTO`` there, since the size is a
    relation it can state and would have the caller state."""

    dim: str
    scale: int
    offset: int = 0


DynamicSpec = tuple[tuple[int, str | Linear], ...] | None


@dataclass(frozen=True)
class JointPlan:
    """The training artifact's layout, decided from the traced graphs (see the module docstring).

    ``keep``: forward graph output positions the forward package returns, with ``forward_outputs`` their
    manifest slots. ``backward_layout``: per backward graph placeholder, ``("size", expr text)`` computed from
    the carrier or ``("tensor", i)``, the backward package's input ``i``; ``backward_inputs`` are those
    inputs' manifest slots. ``*_dynamic``: per package input, its dynamic dims as ``(dim, declared name or
    COMPOUND)`` pairs, ``None`` when static.
    """

    keep: tuple[int, ...]
    forward_outputs: tuple[Slot, ...]
    forward_dynamic: tuple[DynamicSpec, ...]
    saved: tuple[tuple[str, Slot], ...]
    size_symbols: tuple[str, ...]
    backward_layout: tuple[tuple[str, Any], ...]
    backward_inputs: tuple[Slot, ...]
    backward_dynamic: tuple[DynamicSpec, ...]
    backward_outputs: tuple[Slot, ...]
    trainable: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    n_outputs: int
    differentiable: tuple[int, ...]


def dynamic_dims(bp: Blueprint, held: Collection[str] = ()) -> list[list[int]]:
    """Per input, the positions of its dynamic dims (a dim of ``held``, one a specialization holds exact, is
    static)."""
    return [[d for d, s in enumerate(i.shape) if isinstance(s, DeclaredDim) and s.name not in held] for i in bp.inputs]


def trace_sizes(bp: Blueprint, ranges: Mapping[str, tuple[int, int]], module: torch.nn.Module) -> dict[str, int]:
    """Example sizes for tracing and export: export's choice, moved where needed so that no dynamic dim
    equals another, a fixed input dim or a weight dim (a coincidence export could mistake for a relation,
    specializing the dim), and none is 0 or 1 (which export specializes). Weights include every buffer, a
    non-persistent one too (a causal mask's size is as good a coincidence as a weight's)."""
    taken = {0, 1}
    taken |= {s for i in bp.inputs for s in i.shape if isinstance(s, int)}
    taken |= {s for t in (*module.parameters(), *module.buffers()) for s in t.shape}
    chosen: dict[str, int] = {}
    for name, start in export_sizes(bp, ranges).items():
        lo, hi = ranges[name]
        options = [start, *range(start + 1, hi + 1), *range(start - 1, lo - 1, -1)]
        chosen[name] = next((v for v in options if v not in taken), start)
        taken.add(chosen[name])
    return chosen


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """A graph's placeholder nodes, in order."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def graph_outputs(gm: torch.fx.GraphModule) -> list[Any]:
    """The nodes a graph returns, in order."""
    return list(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def plan_forward(graphs: JointGraphs) -> tuple[tuple[int, ...], tuple[Slot, ...], dict[str, Slot]]:
    """Which forward outputs to keep, their manifest slots, and where each saved activation comes from.

    Sizes saved for the backward are dropped (the runtime reads them from the inputs); an activation that is
    a forward input, or that another kept output already returns, is referenced instead of returned again.
    """
    ph_index = {n.name: i for i, n in enumerate(placeholders(graphs.forward))}
    keep: list[int] = []
    kept_by_node: dict[str, int] = {}
    slots: list[Slot] = []
    saved: dict[str, Slot] = {}
    for j, (node, slot) in enumerate(zip(graph_outputs(graphs.forward), graphs.forward_outputs, strict=True)):
        if slot[0] == "saved_size":
            continue
        if slot[0] == "saved" and node.name in ph_index:
            saved[slot[1]] = ("forward_input", ph_index[node.name])
            continue
        if slot[0] == "saved" and node.name in kept_by_node:
            saved[slot[1]] = ("forward_output", kept_by_node[node.name])
            continue
        kept_by_node.setdefault(node.name, len(keep))
        if slot[0] == "saved":
            saved[slot[1]] = ("forward_output", len(keep))
            slots.append(("saved",))
        else:
            slots.append(tuple(slot))
        keep.append(j)
    return tuple(keep), tuple(slots), saved


def symbol_dims(graphs: JointGraphs, bp: Blueprint) -> dict[str, str]:
    """Each input size symbol's declared dim name."""
    out: dict[str, str] = {}
    for sym, (k, d) in graphs.symbols.items():
        declared = bp.inputs[k].shape[d]
        if not isinstance(declared, DeclaredDim):
            raise JointUnsupported(f"size symbol {sym} is input {k} dim {d}, which the blueprint declares fixed")
        out[sym] = declared.name
    return out


def linear(size: torch.SymInt, names: Mapping[str, str]) -> Linear | None:
    """``size`` as a :class:`Linear` form of one declared dim (integer scale >= 1 and offset), else ``None``."""
    expr = size.node.expr
    symbols = list(expr.free_symbols)
    if len(symbols) != 1 or str(symbols[0]) not in names:
        return None
    try:
        poly = sympy.Poly(expr, symbols[0])
    except sympy.PolynomialError:  # FloorDiv, Mod and the like
        return None
    if poly.degree() != 1:
        return None
    scale, offset = poly.all_coeffs()
    if not (scale.is_Integer and offset.is_Integer and int(scale) >= 1):
        return None
    return Linear(names[str(symbols[0])], int(scale), int(offset))


def backward_dynamic(graphs: JointGraphs, node: torch.fx.Node, names: Mapping[str, str]) -> DynamicSpec:
    """One backward input's dynamic dims: declared dims by name, sizes linear in one of them as :class:`Linear`,
    other compound sizes as :data:`COMPOUND`."""
    spec: list[tuple[int, str | Linear]] = []
    for d, (size, symbol) in enumerate(zip(node.meta["val"].shape, graphs.symbolic_dims(node.name), strict=True)):
        if symbol is not None and symbol in names:
            spec.append((d, names[symbol]))
        elif not isinstance(size, int):
            spec.append((d, linear(size, names) or COMPOUND))
    return tuple(spec) or None


def plan_artifact(graphs: JointGraphs, bp: Blueprint, held: Collection[str] = ()) -> JointPlan:
    """The training artifact's layout for ``graphs`` traced from ``bp``'s module (pure: nothing runs); the dims
    of ``held`` were traced static (see :func:`dynamic_dims`)."""
    keep, forward_outputs, saved = plan_forward(graphs)
    names = symbol_dims(graphs, bp)
    forward_dynamic: list[DynamicSpec] = []
    for slot in graphs.forward_inputs:
        shape = bp.inputs[slot[1]].shape if slot[0] == "input" else ()
        dims = tuple((d, s.name) for d, s in enumerate(shape) if isinstance(s, DeclaredDim) and s.name not in held)
        forward_dynamic.append(dims or None)
    used = tuple(graphs.size_symbols())
    layout: list[tuple[str, Any]] = []
    inputs: list[Slot] = [("sizes",)] if used else []
    dynamic: list[DynamicSpec] = [tuple((i, names[s]) for i, s in enumerate(used))] if used else []
    for node, slot in zip(placeholders(graphs.backward), graphs.backward_inputs, strict=True):
        if slot[0] == "size":
            layout.append(("size", slot[1]))
            continue
        if slot[0] == "saved":
            if slot[1] not in saved:
                raise JointUnsupported(f"the backward needs {slot[1]!r}, which the forward neither takes nor returns")
            inputs.append(saved[slot[1]])
        else:
            inputs.append(tuple(slot))
        layout.append(("tensor", len(inputs) - 1))
        dynamic.append(backward_dynamic(graphs, node, names))
    return JointPlan(
        keep=keep,
        forward_outputs=forward_outputs,
        forward_dynamic=tuple(forward_dynamic),
        saved=tuple(saved.items()),
        size_symbols=used,
        backward_layout=tuple(layout),
        backward_inputs=tuple(inputs),
        backward_dynamic=tuple(dynamic),
        backward_outputs=tuple(tuple(s) for s in graphs.backward_outputs if s[0] != "none"),
        trainable=tuple(s[1] for s in graphs.backward_outputs if s[0] == "param"),
        sizes=tuple(graphs.symbols[s] for s in used),
        n_outputs=sum(1 for s in forward_outputs if s[0] == "output"),
        differentiable=tuple(sorted(s[1] for s in graphs.backward_inputs if s[0] == "tangent")),
    )
