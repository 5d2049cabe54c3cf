"""Gemma (Gemma Team 2024, "Gemma: Open Models Based on Gemini Research and Technology"),
Hugging Face ``GemmaForCausalLM`` built from a ``GemmaConfig``.

Shrunk: 2 layers, width 64, 4 query heads of 16 and 1 key/value head (multi-query, as
Gemma-2B), GeGLU intermediate 172, vocabulary 256, 64 positions (Gemma-2B: 18 layers, width
2048, head_dim 256, vocabulary 256000). Default initialisation from ``transformers``:
N(0, 0.02) linear and embedding weights; Gemma's RMSNorm multiplies by (1 + w) with w at 0.
The embedding output is multiplied by sqrt(hidden_size) (here 8) before the first block, and
the output head is tied to the embedding.

Expected healthy: pre-RMSNorm residual decoder the Gemma models were trained as; the sqrt(d)
scaling makes the forward embedding O(1) and the input gradient correspondingly sqrt(d) larger
than the residual-stream gradient, a fixed, benign factor (the same as the original
Transformer's embedding scale).
"""

from __future__ import annotations

import torch
from transformers import GemmaConfig, GemmaForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-RMSNorm GeGLU decoder with a sqrt(d)-scaled tied embedding, Gemma's own recipe."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2)
    return GemmaForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
