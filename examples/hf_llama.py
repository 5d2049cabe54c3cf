"""A Llama-architecture decoder (RMSNorm, SwiGLU, rotary), built from a config (no download).

Run: ``HF_HUB_OFFLINE=1 gradscope analyze examples/hf_llama.py``.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 512


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config)


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
