"""Qwen2 (Yang et al. 2024, "Qwen2 Technical Report"), Hugging Face ``Qwen2ForCausalLM``
built from a ``Qwen2Config``.

Shrunk: 2 layers, width 64, 4 query heads and 2 key/value heads, SwiGLU intermediate 172,
vocabulary 256, 64 positions (Qwen2-0.5B: 24 layers, width 896, vocabulary 151936). Default
initialisation from ``transformers``: N(0, 0.02) linear and embedding weights, zero biases
(Qwen2 keeps a bias on q/k/v), RMSNorm at 1; rotary positions; untied output head.

Expected healthy: the Llama recipe (pre-RMSNorm, SwiGLU, GQA) with q/k/v biases, which the
whole Qwen2 series was trained with.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-RMSNorm SwiGLU decoder with GQA and qkv biases at Qwen2's default init."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2)
    return Qwen2ForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
