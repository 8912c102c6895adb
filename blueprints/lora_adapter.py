"""LoRA adapter seed: a frozen base projection plus a trainable low-rank update, ``W x + (a/r) B A x``.

Rank 8 on a 256 -> 256 projection: the seed through which a host learns a correction to a layer it keeps
frozen. Standard LoRA starts ``B`` at zero so the adapter begins as a no-op; here ``B`` is seeded random,
because an all-zero path would let a compiled artifact that drops it pass every parity check. Batch
spans 1 (single-sample inference) to 64 (a training micro-batch); representative shapes start at 2 so any
of them can serve as an export example (torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

WIDTH = 256
RANK = 8
ALPHA = 16.0


class LoRALinear(nn.Module):
    def __init__(self, width: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.lora_a = nn.Linear(width, rank, bias=False)
        self.lora_b = nn.Linear(rank, width, bias=False)
        # Scaled so the update is comparable to, not dominant over, the base projection's output.
        nn.init.normal_(self.lora_b.weight, std=1.0 / rank)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scaling


def build() -> nn.Module:
    with seeded(7):
        return LoRALinear(WIDTH, RANK, ALPHA).eval()


BATCH = Dim("batch", 1, 64)

LORA_ADAPTER = Blueprint(
    name="lora_adapter",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, WIDTH)),),
    representative=({"batch": 2}, {"batch": 8}, {"batch": 64}),
    # Small batches are GEMV-like, where freezing's prepacked weights stop paying off: certify them apart.
    buckets={"batch": [(1, 4), (5, 64)]},
    # No norm: absolute rounding near zero outputs grows with input scale; 2e-3 covers magnitude-1e3 inputs.
    tolerance=Tolerance(atol=2e-3, rtol=1e-3),
    description="Frozen Linear(256, 256) plus a rank-8 LoRA update (alpha 16, B seeded non-zero).",
)
