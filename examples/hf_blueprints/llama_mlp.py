"""Hugging Face transformers' ``LlamaMLP`` as a seed: the gated feed-forward of Llama, taken as is.

``down(silu(gate(x)) * up(x))`` at hidden size 256 (intermediate 512, no biases), built from a
``LlamaConfig`` as a user project would, without a pre-norm (the catalog's ``swiglu`` adds one): the output
grows with the square of the input's scale. Batch spans 1..64 over a ``(batch, 256)`` activation, the
widths of examples/grow.py's host, so a certified entry can be grafted there with
``--blueprints examples/hf_blueprints --blueprint hf_llama_mlp``.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256
CONFIG = LlamaConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, hidden_act="silu", mlp_bias=False)


def build() -> nn.Module:
    with seeded(21):
        return LlamaMLP(CONFIG).eval()


BATCH = Dim("batch", 1, 64)

HF_LLAMA_MLP = Blueprint(
    name="hf_llama_mlp",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, WIDTH)),),
    representative=({"batch": 2}, {"batch": 8}, {"batch": 64}),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="transformers' LlamaMLP (hidden 256, intermediate 512, SiLU gate, no biases).",
)
