"""Hugging Face transformers' ``LlamaRMSNorm`` as a seed: Llama's norm, computed in float32, taken as is.

Hidden size 256 over a ``(batch, 256)`` activation (batch 1..64), the widths of examples/grow.py's host. Its
only weight starts at ones, so every seed starts from the same weights: a norm seed learns its scale.
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256


def build() -> nn.Module:
    with seeded(22):
        return LlamaRMSNorm(WIDTH, eps=1e-6).eval()


BATCH = Dim("batch", 1, 64)

HF_LLAMA_RMSNORM = Blueprint(
    name="hf_llama_rmsnorm",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, WIDTH)),),
    representative=({"batch": 2}, {"batch": 8}, {"batch": 64}),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="transformers' LlamaRMSNorm (hidden 256, eps 1e-6).",
)
