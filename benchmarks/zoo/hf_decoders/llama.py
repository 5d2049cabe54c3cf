"""Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"),
Hugging Face ``LlamaForCausalLM`` built from a ``LlamaConfig``.

Shrunk: 2 layers, width 64, 4 heads of 16, SwiGLU intermediate 172, vocabulary 256, 64
positions (Llama-7B: 32 layers, width 4096, vocabulary 32000). Default initialisation from
``transformers``: N(0, 0.02) (``initializer_range``) for every linear and embedding weight,
RMSNorm weights at 1; rotary positions; untied output head.

Expected healthy: pre-RMSNorm residual blocks with SwiGLU and a final RMSNorm, the recipe of
Llama 1-3 and of most open decoders since; trains from this init.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-RMSNorm SwiGLU decoder with Llama's default N(0, 0.02) init, as Llama is trained."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2)
    return LlamaForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
