"""Conv-BN-ReLU seed: the basic convolutional unit, Conv2d(16 -> 32, 3x3) + BatchNorm2d + ReLU.

The seed a convolutional host grows to widen a stage. BatchNorm runs in eval mode on running statistics
drawn at build time, so the normalisation is a real per-channel affine map (and a compiler that folds it
into the convolution has something to get wrong). Batch spans 1..32; height and width are independent
dims from 8 (below that a 3x3 receptive field sees mostly padding) to 64 (a small feature map).
Representative shapes keep every dim >= 2 so any of them can serve as an export example (torch.export
specializes a size-1 dim).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

IN_CHANNELS = 16
OUT_CHANNELS = 32


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        # Fresh BatchNorm is the identity map (mean 0, var 1, weight 1, bias 0); give it statistics.
        with torch.no_grad():
            self.bn.running_mean.normal_(0.0, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def build() -> nn.Module:
    with seeded(4):
        return ConvBNReLU(IN_CHANNELS, OUT_CHANNELS).eval()


BATCH = Dim("batch", 1, 32)
HEIGHT = Dim("height", 8, 64)
WIDTH = Dim("width", 8, 64)

CONV_BN_RELU = Blueprint(
    name="conv_bn_relu",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, IN_CHANNELS, HEIGHT, WIDTH)),),
    representative=(
        {"batch": 2, "height": 32, "width": 32},
        {"batch": 8, "height": 16, "width": 24},
        {"batch": 32, "height": 64, "width": 64},
    ),
    # No norm before the conv: absolute rounding grows with input scale, and ReLU keeps outputs near 0,
    # where only atol applies. 5e-3 passes inputs of magnitude 1e3 even with BatchNorm folded into the conv.
    tolerance=Tolerance(atol=5e-3, rtol=1e-3),
    description="Conv2d(16, 32, 3x3, pad 1) -> BatchNorm2d (eval, seeded running stats) -> ReLU.",
)
