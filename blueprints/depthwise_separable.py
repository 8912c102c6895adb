"""Depthwise-separable seed: a MobileNet-style block, depthwise 3x3 then pointwise 1x1, then Hardswish.

The cheap way for a convolutional host to grow capacity: the depthwise conv mixes space per channel,
the pointwise conv mixes channels (32 -> 64), at a fraction of a dense 3x3's cost. Hardswish is the
MobileNetV3 activation. Batch spans 1..32; height and width are independent dims from 8 to 64, the
feature-map sizes where such blocks sit. Representative shapes keep every dim >= 2 so any of them can serve
as an export example (torch.export specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

CHANNELS = 32
OUT_CHANNELS = 64


class DepthwiseSeparable(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, out_channels, 1)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pointwise(self.depthwise(x)))


def build() -> nn.Module:
    with seeded(5):
        return DepthwiseSeparable(CHANNELS, OUT_CHANNELS).eval()


BATCH = Dim("batch", 1, 32)
HEIGHT = Dim("height", 8, 64)
WIDTH = Dim("width", 8, 64)

DEPTHWISE_SEPARABLE = Blueprint(
    name="depthwise_separable",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, CHANNELS, HEIGHT, WIDTH)),),
    representative=(
        {"batch": 2, "height": 32, "width": 32},
        {"batch": 8, "height": 24, "width": 16},
        {"batch": 32, "height": 64, "width": 64},
    ),
    # No norm: absolute rounding near zero outputs grows with input scale; 2e-3 covers magnitude-1e3 inputs.
    tolerance=Tolerance(atol=2e-3, rtol=1e-3),
    description="Depthwise Conv2d(32, 3x3) -> pointwise Conv2d(32 -> 64, 1x1) -> Hardswish.",
)
