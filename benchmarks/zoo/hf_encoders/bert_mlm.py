"""BERT masked language model (Hugging Face ``BertForMaskedLM``), shrunk.

Architecture: Devlin et al. (2019), "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding": a Post-LN Transformer encoder
(word + position + token-type embeddings, LayerNorm, then blocks of
self-attention and a GELU feed-forward, each followed by add & LayerNorm) and
an MLM head (dense + GELU + LayerNorm + decoder tied to the word embeddings).

Shrunk: vocab 512, hidden 64, 2 layers, 4 heads, feed-forward 128, 64
positions; batch 2 x 16 tokens. Default Hugging Face init (normal(0, 0.02)
weights, zero biases, unit LayerNorm), train mode (dropout 0.1 on).

Why healthy: this is the initialisation BERT is pre-trained from; with two
Post-LN layers the LayerNorm gains are far from the depths at which Post-LN
needs warm-up (Xiong et al. 2020), and BERT-base (12 layers) trains from it
with a standard warm-up schedule.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``bert.embeddings.word_embeddings``' output is
14.2x the RMS at the logits (norm ratio 5.0).
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "BERT is pre-trained from exactly this default init; two Post-LN layers are shallow."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64)
    return BertForMaskedLM(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 16), generator=g)
