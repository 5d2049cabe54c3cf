"""GPT-2 (small-shaped but tiny) built from a transformers config: no download, no weights.

Run: ``HF_HUB_OFFLINE=1 gradscope analyze examples/hf_gpt2.py``. symbolic_trace fails on
every Hugging Face model; gradscope falls back to torch.export and says so (GS801).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 512


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
