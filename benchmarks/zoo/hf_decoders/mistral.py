"""Mistral (Jiang et al. 2023, "Mistral 7B"), Hugging Face ``MistralForCausalLM`` built from
a ``MistralConfig``.

Shrunk: 2 layers, width 64, 4 query heads and 2 key/value heads (grouped-query attention),
SwiGLU intermediate 172, vocabulary 256, 64 positions (Mistral-7B: 32 layers, width 4096,
32/8 heads, vocabulary 32000); the default sliding window (4096) is wider than the 16-token
inputs. Default initialisation from ``transformers``: N(0, 0.02) linear and embedding weights,
RMSNorm at 1; rotary positions; untied output head.

Expected healthy: Llama's pre-RMSNorm SwiGLU decoder with GQA and sliding-window attention,
neither of which changes how gradients flow through the residual stream; trains from this init.
"""

from __future__ import annotations

import torch
from transformers import MistralConfig, MistralForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Llama-style pre-RMSNorm decoder with grouped-query attention, Mistral's default init."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    return MistralForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
