"""The one module that touches torch's internal joint-graph APIs (AOTAutograd, fake tensors, symbolic shapes).

Why private APIs: a training artifact needs the forward and the backward as two graphs, with the weights as
inputs and the activations the backward needs as forward outputs. torch has no public API for that split.
``torch.export`` traces a forward only, and exporting a function that calls ``torch.func.vjp`` or
``torch.autograd.grad`` fails. AOTAutograd, which ``torch.compile`` uses internally, does the split:

1. ``aot_export_joint_with_descriptors`` traces the joint forward+backward graph of the module on fake
   inputs whose dynamic dims are symbols (a ``FakeTensorMode`` with a ``ShapeEnv``, and a
   ``StatelessSymbolicContext`` per input). Every graph input and output carries a *descriptor* that says
   what it is: a parameter, a buffer, a user input, a mutated buffer's new value, a gradient, and so on.
2. ``aot_compile_joint_with_descriptors`` partitions it with ``min_cut_rematerialization_partition``. The
   forward and backward "compilers" passed here only capture the two graphs.

These names live under ``torch._functorch`` and ``torch._subclasses`` and change between releases, so this
module is the only place that imports them (at compile time, in Tezzeret; Kasmina never does), and
tests/tezzeret/test_joint.py pins the behaviour relied on here: the signatures, the descriptor classes and their
fields, and that saved values and size symbols are named consistently between the two graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree

# Slots name what each graph input or output is, as plain tuples (they end up in a JSON manifest):
#   ("param", fqn) ("buffer", fqn) ("input", k)             forward inputs
#   ("mutation", fqn) ("output", k) ("saved", name)         forward outputs (name: the backward's placeholder)
#   ("saved_size", name)                                    forward outputs that are sizes (the runtime reads
#                                                           those from the inputs instead)
#   ("saved", name) ("size", expr) ("tangent", k)           backward inputs (expr: a size expression over the
#                                                           input dims' symbols, e.g. "s0*s1", as text)
#   ("param", fqn) ("input", k) ("none",)                   backward outputs (gradients)
Slot = tuple[Any, ...]


class JointUnsupported(RuntimeError):
    """The module's joint graph has something the training artifact cannot serve (named in the message)."""


@dataclass(frozen=True)
class JointGraphs:
    """The partitioned forward and backward graphs of one module, and what each graph input/output is.

    ``symbols`` maps each dynamic size symbol to the (input index, dim index) it was created for, so the
    runtime can read its value from the inputs; ``size_exprs`` maps each ``("size", expr)`` slot's text to
    its expression (see :func:`evaluate_size`). ``random_ops`` lists the seeded-random operators of the
    joint graph (dropout and the like): compiled and eager cannot draw the same numbers.
    """

    forward: torch.fx.GraphModule
    backward: torch.fx.GraphModule
    forward_inputs: tuple[Slot, ...]
    forward_outputs: tuple[Slot, ...]
    backward_inputs: tuple[Slot, ...]
    backward_outputs: tuple[Slot, ...]
    symbols: dict[str, tuple[int, int]]
    out_spec: pytree.TreeSpec
    random_ops: tuple[str, ...]
    size_exprs: dict[str, Any]

    def size_symbols(self) -> list[str]:
        """The symbols the backward's sizes are computed from, in a stable order."""
        found = [str(sym) for e in self.size_exprs.values() for sym in e.free_symbols]
        return sorted(dict.fromkeys(found), key=lambda sym: self.symbols.get(sym, (len(self.symbols), 0)))

    def symbolic_dims(self, node_name: str) -> list[str | None]:
        """For a backward placeholder: per dim, the symbol it equals (``None``: static or a compound size)."""
        node = next(n for n in self.backward.graph.nodes if n.op == "placeholder" and n.name == node_name)
        return [_symbol_of(s) for s in node.meta["val"].shape]


def evaluate_size(expr: Any, values: dict[str, Any]) -> Any:
    """A size expression (sums, products, integer powers, floor division, modulo of symbols and integers)
    computed from ``values`` by symbol name: ints give an int; symbolic sizes under export give a size
    expression in the exported graph."""
    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    if isinstance(expr, sympy.Symbol):
        return values[str(expr)]
    if isinstance(expr, sympy.Integer):
        return int(expr)
    args = [evaluate_size(a, values) for a in expr.args]
    if isinstance(expr, sympy.Add):
        total = args[0]
        for a in args[1:]:
            total = total + a
        return total
    if isinstance(expr, sympy.Mul):
        product = args[0]
        for a in args[1:]:
            product = product * a
        return product
    if isinstance(expr, sympy.Pow) and isinstance(expr.exp, sympy.Integer) and int(expr.exp) > 0:
        product = args[0]
        for _ in range(int(expr.exp) - 1):
            product = product * args[0]
        return product
    if isinstance(expr, FloorDiv):
        return args[0] // args[1]
    if isinstance(expr, Mod | PythonMod):
        return args[0] % args[1]
    raise JointUnsupported(f"the backward needs the size expression {expr}, which Esper cannot compute")


def _symbol_of(size: Any) -> str | None:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        if isinstance(expr, sympy.Symbol):
            return str(expr)
    return None


def fake_inputs(
    examples: Sequence[torch.Tensor], dynamic: Sequence[Sequence[int]]
) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """Fake tensors for ``examples`` whose dims listed in ``dynamic[k]`` are fresh size symbols.

    Returns the fake mode (to trace under) and the fakes, which require grad when floating point.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    # No duck sizing: two dims whose example sizes happen to be equal must stay two symbols.
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False))
    fakes = []
    with mode:
        for x, dyn in zip(examples, dynamic, strict=True):
            sizes = [DimDynamic.DYNAMIC if d in dyn else DimDynamic.STATIC for d in range(x.dim())]
            fake = mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
            if fake.dtype.is_floating_point:
                fake.requires_grad_(True)
            fakes.append(fake)
    return mode, tuple(fakes)


def _forward_input(desc: Any) -> Slot:
    from torch._functorch._aot_autograd.descriptors import BufferAOTInput, ParamAOTInput, PlainAOTInput

    if isinstance(desc, ParamAOTInput):
        return ("param", desc.target)
    if isinstance(desc, BufferAOTInput):
        return ("buffer", desc.target)
    if isinstance(desc, PlainAOTInput):
        return ("input", desc.idx)
    raise JointUnsupported(f"forward graph input {desc!r} is not a parameter, buffer or plain input")


def _mutated(desc: Any) -> Slot:
    inner = _forward_input(desc.mutated_input)
    if inner[0] != "buffer":
        raise JointUnsupported(f"the module mutates {inner[0]} {inner[1]!r} in place; only buffers may be mutated")
    return ("mutation", inner[1])


def _forward_outputs(gm: torch.fx.GraphModule) -> tuple[Slot, ...]:
    from torch._functorch._aot_autograd.descriptors import (
        InputMutationAOTOutput,
        PlainAOTOutput,
        SavedForBackwardsAOTOutput,
    )

    out = next(n for n in gm.graph.nodes if n.op == "output")
    slots: list[Slot] = []
    for node, desc in zip(out.args[0], out.meta["desc"], strict=True):
        if isinstance(desc, InputMutationAOTOutput):
            slots.append(_mutated(desc))
        elif isinstance(desc, PlainAOTOutput):
            slots.append(("output", desc.idx))
        elif isinstance(desc, SavedForBackwardsAOTOutput):
            slots.append(("saved_size" if isinstance(node.meta["val"], torch.SymInt) else "saved", node.name))
        else:
            raise JointUnsupported(f"forward graph output {desc!r} (aliased or intermediate outputs) is not supported")
    return tuple(slots)


def _backward_inputs(gm: torch.fx.GraphModule, exprs: dict[str, Any]) -> tuple[Slot, ...]:
    from torch._functorch._aot_autograd.descriptors import PlainAOTOutput, TangentAOTInput

    slots: list[Slot] = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        desc = node.meta.get("desc")
        val = node.meta["val"]
        if isinstance(desc, TangentAOTInput):
            if not isinstance(desc.output, PlainAOTOutput):
                raise JointUnsupported(f"backward tangent of {desc.output!r} is not supported")
            slots.append(("tangent", desc.output.idx))
        elif isinstance(val, torch.SymInt):
            expr = val.node.expr
            exprs[str(expr)] = expr
            slots.append(("size", str(expr)))
        elif isinstance(val, torch.Tensor):
            slots.append(("saved", node.name))
        else:
            raise JointUnsupported(f"backward graph input {node.name} is a {type(val).__name__}")
    return tuple(slots)


def _backward_outputs(gm: torch.fx.GraphModule) -> tuple[Slot, ...]:
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput

    out = next(n for n in gm.graph.nodes if n.op == "output")
    slots: list[Slot] = []
    for node, desc in zip(out.args[0], out.meta["desc"], strict=True):
        if node is None:
            slots.append(("none",))
        elif isinstance(desc, GradAOTOutput):
            slots.append(_forward_input(desc.grad_of))
        else:
            raise JointUnsupported(f"backward graph output {desc!r} is not a gradient")
    return tuple(slots)


def _draws_random(node: torch.fx.Node) -> bool:
    """Whether a call to a seeded-random operator really draws: not when its probability argument
    (``p``, ``dropout_p``) is 0 or its ``train`` flag is off (attention kernels carry a dropout they skip)."""
    schema = node.target._schema  # type: ignore[union-attr]
    for position, arg in enumerate(schema.arguments):
        if arg.name not in ("p", "dropout_p", "train"):
            continue
        if arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        elif position < len(node.args):
            value = node.args[position]
        else:
            value = arg.default_value
        if isinstance(value, bool | int | float) and not value:
            return False
    return True


def random_ops(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """The seeded-random operators a graph calls and that really draw (dropout, ``rand_like``...), by name."""
    found = []
    for node in gm.graph.nodes:
        target = node.target
        seeded = isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags
        if node.op == "call_function" and seeded and _draws_random(node) and str(target) not in found:
            found.append(str(target))
    return tuple(found)


def trace_joint(
    module: torch.nn.Module, examples: Sequence[torch.Tensor], dynamic: Sequence[Sequence[int]]
) -> JointGraphs:
    """Trace ``module`` (in its current train/eval mode) into partitioned forward and backward graphs.

    ``examples`` are real tensors giving dtypes and static sizes; ``dynamic[k]`` lists the dims of input
    ``k`` that are dynamic. Nothing runs on real data.
    """
    from torch._functorch.aot_autograd import (
        aot_compile_joint_with_descriptors,
        aot_export_joint_with_descriptors,
    )
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    mode, fakes = fake_inputs(examples, dynamic)
    captured: dict[str, torch.fx.GraphModule] = {}

    def capture(graph: str) -> Any:
        def compiler(gm: torch.fx.GraphModule, _args: Any) -> torch.fx.GraphModule:
            captured[graph] = gm
            return gm

        return compiler

    with contextlib.ExitStack() as stack:
        joint = aot_export_joint_with_descriptors(stack, module, fakes)
        found_random = random_ops(joint.graph_module)
        aot_compile_joint_with_descriptors(
            joint,
            partition_fn=min_cut_rematerialization_partition,
            fw_compiler=capture("forward"),
            bw_compiler=capture("backward"),
        )
    if "backward" not in captured:
        raise JointUnsupported("AOTAutograd produced no backward graph (no input or parameter requires grad)")
    fw, bw = captured["forward"], captured["backward"]
    exprs: dict[str, Any] = {}
    symbols: dict[str, tuple[int, int]] = {}
    for k, fake in enumerate(fakes):
        for d, size in enumerate(fake.shape):
            name = _symbol_of(size)
            if name is not None:
                symbols.setdefault(name, (k, d))
    graphs = JointGraphs(
        forward=fw,
        backward=bw,
        forward_inputs=tuple(_forward_input(n.meta["desc"]) for n in fw.graph.nodes if n.op == "placeholder"),
        forward_outputs=_forward_outputs(fw),
        backward_inputs=_backward_inputs(bw, exprs),
        backward_outputs=_backward_outputs(bw),
        symbols=symbols,
        out_spec=joint.out_spec,
        random_ops=found_random,
        size_exprs=exprs,
    )
    unknown = [sym for sym in graphs.size_symbols() if sym not in symbols]
    if unknown:
        raise JointUnsupported(f"the backward needs sizes {unknown} that no input dim carries")
    probe = {sym: 2 for sym in graphs.size_symbols()}
    for expr in exprs.values():
        evaluate_size(expr, probe)  # refuses an expression it cannot compute now, not at export
    del mode
    return graphs
