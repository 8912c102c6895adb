"""Pins the internal torch APIs that esper.tezzeret.joint wraps (AOTAutograd's joint export with descriptors,
the min-cut partitioner, fake tensors with symbolic sizes) and the behaviour the training artifact relies on:
what each graph input and output is, that saved values and sizes are named consistently between the two
graphs, and that running the graphs reproduces eager autograd. No AOTInductor compile here."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from torch import nn

from esper.tezzeret.joint import JointGraphs, evaluate_size, fake_inputs, trace_joint


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


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


def test_the_private_apis_have_the_signatures_and_fields_used() -> None:
    from torch._functorch._aot_autograd import descriptors as d
    from torch._functorch.aot_autograd import aot_compile_joint_with_descriptors, aot_export_joint_with_descriptors
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    assert list(inspect.signature(aot_export_joint_with_descriptors).parameters)[:3] == ["stack", "mod", "args"]
    assert {"partition_fn", "fw_compiler", "bw_compiler"} <= set(
        inspect.signature(aot_compile_joint_with_descriptors).parameters
    )
    assert {"joint_module", "num_fwd_outputs"} <= set(inspect.signature(min_cut_rematerialization_partition).parameters)
    assert "duck_shape" in inspect.signature(ShapeEnv._init).parameters
    assert "dynamic_sizes" in {f.name for f in dataclasses.fields(StatelessSymbolicContext)}
    assert DimDynamic.DYNAMIC and DimDynamic.STATIC
    fields = {
        d.ParamAOTInput: "target",
        d.BufferAOTInput: "target",
        d.PlainAOTInput: "idx",
        d.InputMutationAOTOutput: "mutated_input",
        d.PlainAOTOutput: "idx",
        d.SavedForBackwardsAOTOutput: "idx",
        d.GradAOTOutput: "grad_of",
        d.TangentAOTInput: "output",
    }
    for cls, name in fields.items():
        assert name in {f.name for f in dataclasses.fields(cls)}, cls
    assert torch.Tag.nondeterministic_seeded in torch.ops.aten.native_dropout.default.tags


def test_fake_inputs_keep_equal_example_sizes_as_separate_symbols() -> None:
    _, (fake,) = fake_inputs([torch.zeros(6, 6, 8)], [[0, 1]])
    b, s, d = fake.shape
    assert isinstance(b, torch.SymInt) and isinstance(s, torch.SymInt)
    assert str(b.node.expr) != str(s.node.expr)
    assert d == 8 and fake.requires_grad


def test_batchnorm_graphs_name_every_input_and_output() -> None:
    g = trace_joint(LinearBN().train(), [torch.randn(4, 8)], [[0]])
    params = [("param", n) for n in ("fc.weight", "fc.bias", "bn.weight", "bn.bias")]
    buffers = [("buffer", n) for n in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")]
    assert g.forward_inputs == (*params, *buffers, ("input", 0))
    mutations = [s for s in g.forward_outputs if s[0] == "mutation"]
    assert mutations == [("mutation", n) for _, n in buffers]
    assert ("output", 0) in g.forward_outputs
    assert {s for s in g.backward_outputs if s[0] != "none"} == {*params, ("input", 0)}
    saved = {s[1] for s in g.forward_outputs if s[0] in ("saved", "saved_size")}
    needed = {s[1] for s in g.backward_inputs if s[0] == "saved"}
    assert needed and needed <= saved
    assert ("tangent", 0) in g.backward_inputs
    assert g.random_ops == ()
    assert set(g.symbols.values()) == {(0, 0)}


def test_saved_sizes_are_expressions_over_input_dims() -> None:
    g = trace_joint(Tokens().train(), [torch.randn(3, 5, 8)], [[0, 1]])
    sizes = [s[1] for s in g.backward_inputs if s[0] == "size"]
    assert sizes, "the backward of a (batch*seq) reshape needs the sizes"
    assert {g.symbols[sym] for sym in g.size_symbols()} == {(0, 0), (0, 1)}
    values = {sym: 7 if g.symbols[sym] == (0, 0) else 11 for sym in g.size_symbols()}
    computed = {evaluate_size(g.size_exprs[text], values) for text in sizes}
    assert computed <= {7, 11, 77}, computed


def test_evaluate_size_computes_what_the_backward_may_ask_for() -> None:
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    a, b = sympy.Symbol("s0", positive=True, integer=True), sympy.Symbol("s1", positive=True, integer=True)
    values = {"s0": 6, "s1": 4}
    assert evaluate_size(a * b + 2, values) == 26
    assert evaluate_size(a**2, values) == 36
    assert evaluate_size(FloorDiv(a * b, 3), values) == 8


def _run(g: JointGraphs, module: nn.Module, x: torch.Tensor, tangent: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the two graphs by their slots, exactly as the training runtime wires the packages."""
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    args = [x if s[0] == "input" else state[s[1]].detach() for s in g.forward_inputs]
    outs = g.forward(*args)
    nodes = next(n for n in g.forward.graph.nodes if n.op == "output").args[0]
    by_name = {node.name: value for node, value in zip(nodes, outs, strict=True)}
    result: dict[str, torch.Tensor] = {}
    for slot, value in zip(g.forward_outputs, outs, strict=True):
        if slot[0] == "mutation":
            result[slot[1]] = value
        elif slot[0] == "output":
            result["output"] = value
    bw_args: list[object] = []
    for slot in g.backward_inputs:
        if slot[0] == "saved":
            bw_args.append(by_name[slot[1]])
        elif slot[0] == "size":
            values = {sym: x.shape[g.symbols[sym][1]] for sym in g.size_symbols()}
            bw_args.append(evaluate_size(g.size_exprs[slot[1]], values))
        else:
            bw_args.append(tangent)
    for slot, grad in zip(g.backward_outputs, g.backward(*bw_args), strict=True):
        if slot[0] != "none":
            result[f"grad {slot[1]}"] = grad
    return result


def test_running_the_graphs_reproduces_eager_autograd_and_buffer_updates() -> None:
    torch.manual_seed(0)
    module = LinearBN().train()
    g = trace_joint(copy.deepcopy(module), [torch.randn(4, 8)], [[0]])
    x = torch.randn(7, 8)  # another batch than the traced one: the graphs are symbolic in it
    tangent = torch.randn(7, 8)
    got = _run(g, module, x, tangent)
    eager = copy.deepcopy(module)
    xe = x.clone().requires_grad_(True)
    y = eager(xe)
    y.backward(tangent)
    torch.testing.assert_close(got["output"], y.detach())
    torch.testing.assert_close(got["grad 0"], xe.grad)
    for name, p in eager.named_parameters():
        torch.testing.assert_close(got[f"grad {name}"], p.grad, msg=name)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        torch.testing.assert_close(got[name], eager.get_buffer(name), msg=name)


def test_sizes_in_the_backward_follow_the_call() -> None:
    torch.manual_seed(0)
    module = Tokens().train()
    g = trace_joint(copy.deepcopy(module), [torch.randn(3, 5, 8)], [[0, 1]])
    x, tangent = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    got = _run(g, module, x, tangent)
    xe = x.clone().requires_grad_(True)
    module(xe).backward(tangent)
    torch.testing.assert_close(got["grad 0"], xe.grad)
    torch.testing.assert_close(got["grad fc.weight"], module.fc.weight.grad)


class Attention(nn.Module):
    """Scaled dot-product attention: its CPU kernel is tagged seeded-random for a dropout it is not asked for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


def test_dropout_is_found_as_randomness_only_in_train_mode() -> None:
    x = [torch.randn(4, 8)]
    assert trace_joint(WithDropout().train(), x, [[0]]).random_ops == ("aten.native_dropout.default",)
    assert trace_joint(WithDropout().eval(), x, [[0]]).random_ops == ()
    assert trace_joint(nn.Dropout(0.0).train(), x, [[0]]).random_ops == ()


def test_attention_without_dropout_is_not_randomness() -> None:
    g = trace_joint(Attention().train(), [torch.randn(2, 4, 6, 8)], [[0, 2]])
    seeded = [
        n
        for n in g.forward.graph.nodes
        if n.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
    ]
    assert seeded, "the attention kernel is tagged seeded-random (else this test pins nothing)"
    assert g.random_ops == ()
