"""A saved activation whose size is linear in one declared dim (``heads*batch``, as attention flattens batch
and heads for its matmuls) is exported as that derived dim: ``Dim.AUTO`` there made export refuse the backward
("must always be related to batch by 4*batch"), and hf_llama_attention's training step fell back to eager.

Traced and exported, never compiled (no Inductor).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim as ExportDim

from esper.blueprint import Blueprint, Dim, Input
from esper.tezzeret.joint import fake_inputs, trace_joint
from esper.tezzeret.joint_plan import COMPOUND, Linear, dynamic_dims, linear, plan_artifact
from esper.tezzeret.training_compile import BackwardGraph, ForwardGraph, backward_arguments, export_dim, export_graph

HEADS = 2


class Scores(nn.Module):
    """Self-attention scores with batch and heads flattened into one dim, as bmm-based attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8 * HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, 8).transpose(1, 2).reshape(b * HEADS, s, 8)
        return torch.bmm(q, q.transpose(1, 2)).softmax(-1).view(b, HEADS, s, s).sum(1)


def test_linear_reads_scale_and_offset_of_one_declared_dim() -> None:
    _, (x,) = fake_inputs([torch.zeros(3, 5)], [[0, 1]])
    b, s = x.shape
    names = {str(b.node.expr): "batch", str(s.node.expr): "seq"}
    assert linear(4 * b, names) == Linear("batch", 4)
    assert linear(2 * s + 3, names) == Linear("seq", 2, 3)
    assert linear(b * s, names) is None  # two dims: Dim.AUTO
    assert linear(b * b, names) is None
    assert linear(b // 2, names) is None


def test_export_dim_turns_a_linear_size_into_a_derived_dim() -> None:
    dims = {"batch": ExportDim("batch", min=1, max=16)}
    assert export_dim("batch", dims) is dims["batch"]
    assert export_dim(COMPOUND, dims) is ExportDim.AUTO
    derived = export_dim(Linear("batch", 4, 1), dims)
    assert (derived.min, derived.max) == (5, 65)


def test_a_backward_saving_a_heads_times_batch_activation_exports() -> None:
    bp = Blueprint(
        name="scores",
        version=1,
        build=Scores,
        inputs=(Input("x", "float32", (Dim("batch", 1, 16), Dim("seq", 1, 32), 8)),),
        representative=({"batch": 3, "seq": 5},),
    )
    torch.manual_seed(0)
    module = Scores().train()
    examples = [torch.randn(3, 5, 8)]
    graphs = trace_joint(module, examples, dynamic_dims(bp))
    plan = plan_artifact(graphs, bp)
    refs = {ref for spec in plan.backward_dynamic if spec for _, ref in spec}
    assert Linear("batch", HEADS) in refs
    state = dict(module.named_parameters())
    fw_args = [examples[s[1]] if s[0] == "input" else state[s[1]].detach() for s in graphs.forward_inputs]
    forward = ForwardGraph(graphs.forward, plan.keep)
    with torch.no_grad():
        fw_outs = forward(*fw_args)
    bw_args = backward_arguments(plan, examples, fw_args, fw_outs, torch.device("cpu"))
    dims = {"batch": ExportDim("batch", min=1, max=16), "seq": ExportDim("seq", min=1, max=32)}
    ep = export_graph(BackwardGraph(graphs, plan), bw_args, plan.backward_dynamic, dims)
    assert ep.range_constraints  # exported with its sizes symbolic
