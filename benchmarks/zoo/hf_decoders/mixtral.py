"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"), Hugging Face ``MixtralForCausalLM``
built from a ``MixtralConfig``: a sparse mixture-of-experts decoder.

Shrunk: 2 layers, width 64, 4 query heads and 2 key/value heads, 4 SwiGLU experts of
intermediate 128 with top-2 routing per token, vocabulary 256, 64 positions (Mixtral-8x7B: 32
layers, width 4096, 8 experts of 14336, top-2, vocabulary 32000). Default initialisation from
``transformers``: N(0, 0.02) for the linear, expert and embedding weights and the router,
RMSNorm at 1; rotary positions; untied output head. The auxiliary load-balancing loss is off
(``output_router_logits=False``), so the logits are the only output differentiated.

Expected healthy: Mistral's pre-RMSNorm decoder with the dense FFN replaced by a routed
mixture of experts (softmax over the top-2 router logits), which Mixtral and its descendants
train from this init; each token's FFN output is a convex combination of two expert outputs,
so the residual stream is unchanged in kind.
"""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-RMSNorm decoder with a top-2-of-4 routed SwiGLU MoE FFN, Mixtral's default init."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    return MixtralForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
