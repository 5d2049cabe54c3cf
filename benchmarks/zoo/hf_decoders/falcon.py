"""Falcon (Almazrouei et al. 2023, "The Falcon Series of Open Language Models"), Hugging Face
``FalconForCausalLM`` built from a ``FalconConfig``.

Shrunk: 2 layers, width 64, 4 query heads with one shared key/value head (multi-query, as
Falcon-7B), vocabulary 256 (Falcon-7B: 32 layers, width 4544, vocabulary 65024). Config
defaults otherwise: the Falcon-7B layout, a parallel block (attention and 4x GeLU MLP read one
LayerNorm output), rotary positions, no biases, a final LayerNorm and a tied output head.
Default initialisation from ``transformers``: N(0, 0.02) linear and embedding weights,
LayerNorm 1/0.

Expected healthy: parallel pre-LN residual decoder with multi-query attention, the layout
Falcon-7B was trained with.
"""

from __future__ import annotations

import torch
from transformers import FalconConfig, FalconForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Parallel pre-LN decoder with multi-query attention at Falcon's default init."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, bos_token_id=0, eos_token_id=1,
                          pad_token_id=2)
    return FalconForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
