"""Norm-activation chain seed: a run of pointwise and row-reduction ops Inductor fuses into few kernels.

LayerNorm -> GELU -> learned per-feature scale and shift -> SiLU -> RMSNorm, over 256 features. No
matmul: the seed is all memory traffic, so it measures what fusion buys and checks that fused
reductions (mean, variance, mean square) agree with eager. Batch spans 1..16 and sequence length 1..128;
a single-token sequence is an ordinary case here (every op is per token). Representative shapes keep
every dim >= 2 so any of them can serve as an export example (torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256


class NormActChain(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        # Seeded away from (1, 0) so the affine step is not the identity.
        self.scale = nn.Parameter(torch.empty(width).uniform_(0.5, 1.5))
        self.shift = nn.Parameter(torch.empty(width).normal_(0.0, 0.5))
        self.rms = nn.RMSNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm(x)) * self.scale + self.shift
        return self.rms(F.silu(y))


def build() -> nn.Module:
    with seeded(8):
        return NormActChain(WIDTH).eval()


BATCH = Dim("batch", 1, 16)
SEQ = Dim("seq", 1, 128)

NORM_ACT_CHAIN = Blueprint(
    name="norm_act_chain",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, SEQ, WIDTH)),),
    representative=({"batch": 2, "seq": 16}, {"batch": 4, "seq": 128}, {"batch": 16, "seq": 64}),
    # The chain starts and ends with a norm, so rounding does not grow with input scale (measured ~1/100 of this).
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="LayerNorm -> GELU -> learned scale/shift -> SiLU -> RMSNorm over 256 features.",
)
