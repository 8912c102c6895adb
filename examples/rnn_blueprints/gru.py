"""A GRU layer declared as a user would: ``nn.GRU`` itself, 128 features, batch 1 to 16, a sequence of 2 to 96
steps. It returns what ``nn.GRU`` returns, the output sequence and the last hidden state."""

from torch import nn

from esper import Blueprint, Dim, Input, seeded

BATCH = Dim("batch", 1, 16)
SEQ = Dim("seq", 2, 96, hot=(12,))  # torch.export unrolls the loop over seq: compiled at exact sizes only


def build() -> nn.Module:
    with seeded(0):
        return nn.GRU(128, 128, batch_first=True).eval()


GRU_128 = Blueprint(
    name="gru_128",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, SEQ, 128)),),
    representative=({"batch": 4, "seq": 32},),
    variants=("default",),
    description="nn.GRU(128, 128) over batch 1-16 and a sequence of 2-96 steps.",
)
