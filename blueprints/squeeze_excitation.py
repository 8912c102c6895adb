"""Squeeze-and-excitation seed: channel attention that rescales a feature map by a learned gate.

Global average pool to one value per channel, a 64 -> 16 -> 64 bottleneck, sigmoid, then scale the
input's channels. The seed lets a convolutional host learn to reweight channels it already has. Batch
spans 1..32; height and width are independent dims from 4 (late, coarse stages, where SE is common) to
64. Representative shapes keep every dim >= 2 so any of them can serve as an export example
(torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

CHANNELS = 64
REDUCTION = 4


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


def build() -> nn.Module:
    with seeded(6):
        return SqueezeExcitation(CHANNELS, REDUCTION).eval()


BATCH = Dim("batch", 1, 32)
HEIGHT = Dim("height", 4, 64)
WIDTH = Dim("width", 4, 64)

SQUEEZE_EXCITATION = Blueprint(
    name="squeeze_excitation",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, CHANNELS, HEIGHT, WIDTH)),),
    representative=(
        {"batch": 2, "height": 7, "width": 7},
        {"batch": 8, "height": 16, "width": 32},
        {"batch": 32, "height": 64, "width": 64},
    ),
    # The gate is in (0, 1) and multiplies the input, so error stays relative to the input.
    tolerance=Tolerance(atol=1e-3, rtol=1e-3),
    description="Squeeze-excitation on 64 channels: avg-pool, Linear(64, 16), ReLU, Linear(16, 64), sigmoid.",
)
