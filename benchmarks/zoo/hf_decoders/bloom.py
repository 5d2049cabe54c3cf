"""BLOOM (BigScience 2022, "BLOOM: A 176B-Parameter Open-Access Multilingual Language
Model"), Hugging Face ``BloomForCausalLM`` built from a ``BloomConfig``.

Shrunk: 2 blocks, width 64, 4 heads, vocabulary 256 (bloom-560m: 24 blocks, width 1024,
vocabulary 250880). Default initialisation from ``transformers``: N(0, 0.02) linear and
embedding weights, zero biases, LayerNorm 1/0. ALiBi position bias (no positional embedding),
a LayerNorm right after the word embedding, pre-LN blocks with GeLU FFN, final LayerNorm, tied
output embedding. ``transformers`` runs BLOOM's attention eagerly (ALiBi).

Expected healthy: pre-LN residual decoder, the architecture all BLOOM sizes were trained with;
the embedding LayerNorm was added precisely for training stability (the BLOOM paper).
"""

from __future__ import annotations

import torch
from transformers import BloomConfig, BloomForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-LN residual decoder with ALiBi and an embedding LayerNorm, as BLOOM was trained."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return BloomForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
