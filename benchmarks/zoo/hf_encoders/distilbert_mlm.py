"""DistilBERT masked language model (Hugging Face ``DistilBertForMaskedLM``), shrunk.

Architecture: Sanh et al. (2019), "DistilBERT, a distilled version of BERT":
BERT's Post-LN encoder without token-type embeddings or pooler, and an MLM head
(vocab_transform + GELU + LayerNorm + projector tied to the word embeddings).

Shrunk: vocab 512, dim 64, 2 layers, 4 heads, hidden 128, 64 positions;
batch 2 x 16 tokens. Default Hugging Face init (normal(0, 0.02)), train mode.

Why healthy: the architecture trains from this init (DistilBERT itself was
initialised from BERT's layers, but the same module trains from scratch like
BERT); two Post-LN layers are shallow.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``distilbert.embeddings.word_embeddings``'
output is 16.8x the RMS at the logits (norm ratio 5.9).
"""

from __future__ import annotations

import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "A two-layer Post-LN BERT-style encoder at the standard 0.02 init trains from scratch."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4,
                              hidden_dim=128, max_position_embeddings=64)
    return DistilBertForMaskedLM(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 16), generator=g)
