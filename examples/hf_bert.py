"""BERT for masked language modelling, built from a transformers config (no download).

Run: ``HF_HUB_OFFLINE=1 gradscope analyze examples/hf_bert.py``. Post-LN encoder layers.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

VOCAB = 512


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=64)
    return BertForMaskedLM(config)


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
