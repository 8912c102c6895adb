"""SwiGLU seed: the gated feed-forward of LLaMA-style transformers, ``w2(silu(w1 h) * w3 h)``.

``h = rmsnorm(x)``: the branch is pre-normed as in the models it imitates, and here that matters for
checking too. The gate multiplies two linear maps of its input, so without the norm the output grows with
the square of the host's activation scale, and no fixed absolute tolerance could both catch errors on
unit-scale inputs and pass rounding noise on inputs of magnitude 1e3.

Width 256 with hidden 512 and no biases. Batch spans 1 (single-sample inference) to 64 (a training
micro-batch); representative shapes start at 2 so any of them can serve as an export example
(torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256
HIDDEN = 512


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


def build() -> nn.Module:
    with seeded(2):
        return SwiGLU(WIDTH, HIDDEN).eval()


BATCH = Dim("batch", 1, 64)

SWIGLU = Blueprint(
    name="swiglu",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, WIDTH)),),
    representative=({"batch": 2}, {"batch": 8}, {"batch": 64}),
    # Small batches are GEMV-like, where freezing's prepacked weights stop paying off: certify them apart.
    buckets={"batch": [(1, 4), (5, 64)]},
    # The pre-norm makes rounding independent of input scale; measured fp32 error is ~1/400 of this.
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="RMSNorm then SwiGLU feed-forward w2(silu(w1 h) * w3 h), 256 -> 512 -> 256, no biases.",
)
