"""Hugging Face transformers' ``LlamaAttention`` as a seed, called with its rotary embedding as
``LlamaDecoderLayer`` calls it: the attention half of a Llama decoder layer, taken as is.

``x + attn(norm(x))`` with ``norm`` a ``LlamaRMSNorm`` and ``attn`` a ``LlamaAttention`` (hidden 64, 4 heads of
16, no GQA, no biases), given ``position_embeddings`` from a ``LlamaRotaryEmbedding`` and a causal
``attention_mask``, as ``LlamaModel`` builds them for its layers. The pre-norm is the layer's own and keeps the
attention logits O(1) at any input scale (see blueprints/causal_attention.py for why that matters for
parity).

The wrapper builds what ``LlamaModel`` would hand the layer from two non-persistent buffers, neither in a
seed's state dict: the rotary ``inv_freq`` (the embedding's own) and ``positions`` 0..127, sliced to the
sequence length for ``position_ids``. The additive causal mask (0 on and below the diagonal, the dtype's lowest
value above) is computed from those positions. It is no sliced ``(128, 128)`` buffer: whether a
``[:seq, :seq]`` slice is contiguous depends on ``seq == 128``, a guard that export refuses over the range
1..128. Attention is transformers' ``"eager"`` implementation: its ``"sdpa"`` one branches on ``seq > 1`` in
Python, which would pin a dynamic sequence length to 2..128; with an explicit mask, a single token (seq 1) is
served too.

Batch spans 1..16 and sequence length 1..128 over a ``(batch, seq, 64)`` activation: a seed for a sequence
model, not for examples/grow.py's ``(batch, 256)`` host.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded

HIDDEN = 64
HEADS = 4
MAX_SEQ = 128
CONFIG = LlamaConfig(
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    num_key_value_heads=HEADS,
    max_position_embeddings=MAX_SEQ,
    rms_norm_eps=1e-6,
    attention_bias=False,
    attention_dropout=0.0,
    attn_implementation="eager",
)


class LlamaSelfAttentionBlock(nn.Module):
    """``LlamaDecoderLayer``'s attention half, with the positions and mask ``LlamaModel`` would pass it."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        # One dim: a slice of a (1, 128) buffer keeps stride 128 on its size-1 dim, and layout code compares it
        # with the sequence length, a guard (seq != 128) that export refuses.
        self.register_buffer("positions", torch.arange(config.max_position_embeddings), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        position_ids = self.positions[: hidden_states.shape[1]].unsqueeze(0)
        future = position_ids[:, None, :, None] < position_ids[:, None, None, :]
        mask = torch.zeros(future.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        mask = mask.masked_fill(future, torch.finfo(hidden_states.dtype).min)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=mask
        )
        return residual + hidden_states


def build() -> nn.Module:
    with seeded(24):
        return LlamaSelfAttentionBlock(CONFIG).eval()


BATCH = Dim("batch", 1, 16)
SEQ = Dim("seq", 1, MAX_SEQ)

HF_LLAMA_ATTENTION = Blueprint(
    name="hf_llama_attention",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (BATCH, SEQ, HIDDEN)),),
    representative=({"batch": 2, "seq": 16}, {"batch": 4, "seq": 128}, {"batch": 16, "seq": 64}),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    description="transformers' LlamaRMSNorm + LlamaAttention with LlamaRotaryEmbedding (hidden 64, 4 heads), "
    "causal, with the residual add: the attention half of LlamaDecoderLayer.",
)
