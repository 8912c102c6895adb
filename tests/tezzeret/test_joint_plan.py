"""Planning the training artifact from traced graphs: a pure function, tested without Inductor.

The graphs are traced with esper.tezzeret.joint.trace_joint on tiny modules; nothing is exported or compiled.
The last tests run the two graphs wired exactly as the plan says (the modules Tezzeret exports, on real
tensors) and compare them with eager autograd.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from esper.blueprint import Blueprint, Dim, Input
from esper.tezzeret.joint import JointGraphs, JointUnsupported, trace_joint
from esper.tezzeret.joint_plan import COMPOUND, graph_outputs, placeholders, plan_artifact
from esper.tezzeret.training_compile import BackwardGraph, ForwardGraph, backward_arguments

BATCH, SEQ = Dim("batch", 1, 16), Dim("seq", 1, 16)


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.fc(x)))


class Tokens(nn.Module):
    """Flattens (batch, seq) into rows: the backward needs both sizes back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        return torch.tanh(self.fc(x.reshape(b * s, d))).reshape(b, s, d) * x


def blueprint(module: type[nn.Module], shape: tuple) -> Blueprint:
    representative = {d.name: 4 for d in shape if isinstance(d, Dim)}
    return Blueprint(
        name="planned",
        version=1,
        build=module,
        inputs=(Input("x", "float32", shape),),
        representative=(representative,),
    )


@pytest.fixture(scope="module")
def bn() -> tuple[Blueprint, nn.Module, JointGraphs]:
    torch.manual_seed(0)
    module = LinearBN().train()
    return blueprint(LinearBN, (BATCH, 8)), module, trace_joint(copy.deepcopy(module), [torch.randn(4, 8)], [[0]])


@pytest.fixture(scope="module")
def tokens() -> tuple[Blueprint, nn.Module, JointGraphs]:
    torch.manual_seed(0)
    module = Tokens().train()
    graphs = trace_joint(copy.deepcopy(module), [torch.randn(3, 5, 8)], [[0, 1]])
    return blueprint(Tokens, (BATCH, SEQ, 8)), module, graphs


def test_the_forward_returns_mutations_outputs_and_each_needed_activation_once(bn) -> None:  # type: ignore[no-untyped-def]
    bp, _, g = bn
    plan = plan_artifact(g, bp)
    kept = [graph_outputs(g.forward)[j].name for j in plan.keep]
    assert len(kept) == len(set(kept)), "an activation is returned twice"
    kinds = [s[0] for s in plan.forward_outputs]
    assert kinds.count("mutation") == 3 and kinds.count("output") == 1 and "saved" in kinds
    assert "saved_size" not in kinds and plan.n_outputs == 1 and plan.differentiable == (0,)
    # Every activation the backward needs is found: a forward input (the input x and the weights are
    # passed again, not returned) by its position, else a kept output holding that very node.
    needed = {s[1] for s in g.backward_inputs if s[0] == "saved"}
    assert needed == set(dict(plan.saved))
    names = [n.name for n in placeholders(g.forward)]
    refs = [ref for _, ref in plan.saved]
    assert ("forward_input", g.forward_inputs.index(("input", 0))) in refs
    for name, ref in plan.saved:
        if ref[0] == "forward_input":
            assert names[ref[1]] == name
        else:
            assert ref[0] == "forward_output" and graph_outputs(g.forward)[plan.keep[ref[1]]].name == name


def test_slots_and_dynamic_dims_follow_the_declaration(bn) -> None:  # type: ignore[no-untyped-def]
    bp, _, g = bn
    plan = plan_artifact(g, bp)
    assert plan.trainable == ("fc.weight", "fc.bias", "bn.weight", "bn.bias")
    assert ("input", 0) in plan.backward_outputs and ("none",) not in plan.backward_outputs
    dynamic = dict(zip(g.forward_inputs, plan.forward_dynamic, strict=True))
    assert dynamic[("input", 0)] == ((0, "batch"),)
    assert all(spec is None for slot, spec in dynamic.items() if slot[0] != "input")
    # No backward size is needed here, so there is no carrier.
    assert plan.size_symbols == () and ("sizes",) not in plan.backward_inputs
    assert [k for k, _ in plan.backward_layout] == ["tensor"] * len(plan.backward_inputs)
    assert len(plan.backward_dynamic) == len(plan.backward_inputs)


def test_backward_sizes_come_from_a_carrier_named_by_declared_dims(tokens) -> None:  # type: ignore[no-untyped-def]
    bp, _, g = tokens
    plan = plan_artifact(g, bp)
    assert plan.backward_inputs[0] == ("sizes",) and plan.backward_dynamic[0] == ((0, "batch"), (1, "seq"))
    assert plan.sizes == ((0, 0), (0, 1))
    assert any(kind == "size" for kind, _ in plan.backward_layout)
    # A (batch*seq, 8) activation is dynamic in a compound size: export chooses (Dim.AUTO).
    assert any(spec and (0, COMPOUND) in spec for spec in plan.backward_dynamic)


def test_a_backward_input_the_forward_does_not_provide_is_refused(bn) -> None:  # type: ignore[no-untyped-def]
    bp, _, g = bn
    slots = list(g.backward_inputs)
    k = next(i for i, s in enumerate(slots) if s[0] == "saved")
    slots[k] = ("saved", "nowhere")
    with pytest.raises(JointUnsupported, match="'nowhere'"):
        plan_artifact(dataclasses.replace(g, backward_inputs=tuple(slots)), bp)


def test_a_size_symbol_on_a_dim_declared_fixed_is_refused(bn) -> None:  # type: ignore[no-untyped-def]
    _, _, g = bn
    fixed = blueprint(LinearBN, (4, 8))
    with pytest.raises(JointUnsupported, match="declares fixed"):
        plan_artifact(g, fixed)


def run_planned(bp: Blueprint, module: nn.Module, g: JointGraphs, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward and backward graph modules Tezzeret exports, fed exactly as the plan says."""
    plan = plan_artifact(g, bp)
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    fw_args = [x if s[0] == "input" else state[s[1]].detach().clone() for s in g.forward_inputs]
    with torch.no_grad():
        fw_outs = ForwardGraph(g.forward, plan.keep)(*fw_args)
    bw_args = backward_arguments(plan, [x], fw_args, fw_outs, torch.device("cpu"))
    with torch.no_grad():
        grads = BackwardGraph(g, plan)(*bw_args)
    out = {f"grad {s[1]}": t for s, t in zip(plan.backward_outputs, grads, strict=True)}
    out.update({s[1]: t for s, t in zip(plan.forward_outputs, fw_outs, strict=True) if s[0] == "mutation"})
    out["output"] = next(t for s, t in zip(plan.forward_outputs, fw_outs, strict=True) if s[0] == "output")
    out["tangent"] = next(t for s, t in zip(plan.backward_inputs, bw_args, strict=True) if s[0] == "tangent")
    return out


@pytest.mark.parametrize("case, shape", [("bn", (7, 8)), ("tokens", (2, 9, 8))])
def test_the_planned_graphs_reproduce_eager_autograd(case: str, shape: tuple, request) -> None:  # type: ignore[no-untyped-def]
    bp, module, g = request.getfixturevalue(case)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))  # another size than the traced one
    got = run_planned(bp, copy.deepcopy(module), g, x)
    eager = copy.deepcopy(module)
    xe = x.clone().requires_grad_(True)
    y = eager(xe)
    y.backward(got["tangent"])
    torch.testing.assert_close(got["output"], y.detach())
    torch.testing.assert_close(got["grad 0"], xe.grad)
    for name, p in eager.named_parameters():
        torch.testing.assert_close(got[f"grad {name}"], p.grad, msg=name)
    for name, b in eager.named_buffers():
        if name in got:
            torch.testing.assert_close(got[name], b, msg=name)
