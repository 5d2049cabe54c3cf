"""Phi (Li et al. 2023, "Textbooks Are All You Need II: phi-1.5 technical report"; phi-2),
Hugging Face ``PhiForCausalLM`` built from a ``PhiConfig``.

Shrunk: 2 layers, width 64, 4 heads, FFN 256, vocabulary 256, 64 positions (phi-2: 32 layers,
width 2560, vocabulary 51200). Default initialisation from ``transformers``: N(0, 0.02) linear
and embedding weights, zero biases, LayerNorm 1/0. Phi's block is a parallel one (attention
and GeLU MLP read the same LayerNorm output and both add to the residual), rotary positions on
half of each head (``partial_rotary_factor=0.5``), a final LayerNorm and an untied biased head.

Expected healthy: parallel pre-LN residual blocks (as GPT-J) are a standard, trainable
decoder layout; phi-1.5/phi-2 were trained with it.
"""

from __future__ import annotations

import torch
from transformers import PhiConfig, PhiForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Parallel pre-LN residual decoder (GPT-J style) at Phi's default N(0, 0.02) init."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return PhiForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
