"""Hugging Face transformers' ``BertOutput`` as a seed: BERT's feed-forward output with its residual, two inputs.

``LayerNorm(dropout(dense(intermediate)) + residual)``: ``intermediate`` is the ``BertIntermediate`` activation
(batch, seq, 256), ``residual`` the attention block's output it is added to (batch, seq, 64); both share the
batch (1..16) and sequence (1..128) dims. Built from a ``BertConfig`` at hidden 64, intermediate 256, with
``hidden_dropout_prob=0.0`` so that training is deterministic and its step can compile (with BERT's 0.1 it
would train eager, as examples/hf_blueprints/gpt2_mlp.py does by design).
"""

from __future__ import annotations

from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertOutput

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

HIDDEN = 64
INTERMEDIATE = 4 * HIDDEN
CONFIG = BertConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_dropout_prob=0.0, layer_norm_eps=1e-12)


def build() -> nn.Module:
    with seeded(25):
        return BertOutput(CONFIG).eval()


BATCH = Dim("batch", 1, 16)
SEQ = Dim("seq", 1, 128)

HF_BERT_OUTPUT = Blueprint(
    name="hf_bert_output",
    version=1,
    build=build,
    inputs=(
        Input("intermediate", "float32", (BATCH, SEQ, INTERMEDIATE)),
        Input("residual", "float32", (BATCH, SEQ, HIDDEN)),
    ),
    representative=({"batch": 2, "seq": 16}, {"batch": 4, "seq": 128}, {"batch": 16, "seq": 64}),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="transformers' BertOutput (intermediate 256 -> hidden 64, residual add, LayerNorm; dropout 0).",
)
