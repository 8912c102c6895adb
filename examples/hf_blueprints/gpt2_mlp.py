"""Hugging Face transformers' ``GPT2MLP`` as a seed: GPT-2's feed-forward with its ``Conv1D`` layers and
residual dropout, taken as is.

``dropout(c_proj(gelu_new(c_fc(x))))`` at hidden size 256 (intermediate 1024), built from a ``GPT2Config``.
Dropout is random in training, so its training route is eager by design (Tezzeret refuses to compile a
random training step); inference (dropout off in ``eval()``) compiles. Batch spans 1..64 over a
``(batch, 256)`` activation, the widths of examples/grow.py's host.
"""

from __future__ import annotations

from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256
CONFIG = GPT2Config(n_embd=WIDTH, activation_function="gelu_new", resid_pdrop=0.1)


def build() -> nn.Module:
    with seeded(23):
        return GPT2MLP(4 * WIDTH, CONFIG).eval()


BATCH = Dim("batch", 1, 64)

HF_GPT2_MLP = Blueprint(
    name="hf_gpt2_mlp",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, WIDTH)),),
    representative=({"batch": 2}, {"batch": 8}, {"batch": 64}),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="transformers' GPT2MLP (hidden 256, intermediate 1024, gelu_new, resid dropout 0.1).",
)
