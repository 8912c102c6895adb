"""Causal self-attention seed: a pre-norm multi-head attention branch added onto its input.

``x + out(attn(qkv(layernorm(x))))`` with d_model 128 and 4 heads of 32, causally masked: the seed that
lets a host sequence model grow a new attention path. The pre-norm is not decoration: without it the
logits grow with the square of the host's activation scale, softmax saturates, and tiny rounding
differences flip which key wins, so compiled and eager outputs could not be compared at any honest
tolerance.

Both batch (1..16) and sequence length are dynamic. Sequence length starts at 2: one token attends only
to itself, so attention degenerates to a projection of the value, and single-token decoding would want a
KV cache this seed does not have. It ends at 128, beyond which the quadratic score matrix stops being a
small seed. Representative shapes keep every dim >= 2 so any of them can serve as an export example
(torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

D_MODEL = 128
HEADS = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, seq, 3, self.heads, d_model // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(batch, seq, d_model))


def build() -> nn.Module:
    with seeded(3):
        return CausalSelfAttention(D_MODEL, HEADS).eval()


BATCH = Dim("batch", 1, 16)
SEQ = Dim("seq", 2, 128)

CAUSAL_ATTENTION = Blueprint(
    name="causal_attention",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, SEQ, D_MODEL)),),
    representative=({"batch": 2, "seq": 16}, {"batch": 4, "seq": 128}, {"batch": 16, "seq": 64}),
    # The pre-norm keeps logits O(1) at any input scale; measured fp32 rounding is ~1/200 of this.
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="Pre-norm causal multi-head self-attention (d_model 128, 4 heads) with a residual add.",
)
