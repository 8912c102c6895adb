"""Residual MLP seed: a pre-norm transformer feed-forward branch added onto its input.

``x + W2 gelu(W1 layernorm(x))`` with width 256 and a 4x expansion, the classic shape of a seed grafted
between two layers of a host: the residual keeps the host's signal flowing while the branch learns. The
pre-norm makes the branch insensitive to the host's activation scale. Batch spans 1 (single-sample
inference) to 64 (a training micro-batch); representative shapes start at 2 so any of them can serve as
an export example (torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256
HIDDEN = 4 * WIDTH


class ResidualMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


def build() -> nn.Module:
    with seeded(1):
        return ResidualMLP(WIDTH, HIDDEN).eval()


BATCH = Dim("batch", 1, 64)

RESIDUAL_MLP = Blueprint(
    name="residual_mlp",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, WIDTH)),),
    representative=({"batch": 2}, {"batch": 8}, {"batch": 64}),
    # Small batches are GEMV-like, where freezing's prepacked weights stop paying off: certify them apart.
    buckets={"batch": [(1, 4), (5, 64)]},
    # The pre-norm makes rounding independent of input scale; measured fp32 error is ~1/300 of this.
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="LayerNorm -> Linear(256, 1024) -> GELU -> Linear(1024, 256), added to the input.",
)
