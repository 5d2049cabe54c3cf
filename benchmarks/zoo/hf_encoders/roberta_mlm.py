"""RoBERTa masked language model (Hugging Face ``RobertaForMaskedLM``), shrunk.

Architecture: Liu et al. (2019), "RoBERTa: A Robustly Optimized BERT
Pretraining Approach": BERT's Post-LN encoder and MLM head, with positions
offset past the padding index (``padding_idx + 1``) and a learned LM-head bias.

Shrunk: vocab 512, hidden 64, 2 layers, 4 heads, feed-forward 128, 66
positions (16 tokens + the padding offset); batch 2 x 16 tokens. Default
Hugging Face init (normal(0, 0.02), zero biases), train mode.

Why healthy: RoBERTa is pre-trained from this default init; at two Post-LN
layers nothing is deep enough to starve the embeddings of gradient.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``roberta.embeddings.word_embeddings``' output
is 13.7x the RMS at the logits (norm ratio 4.8).
"""

from __future__ import annotations

import torch
from transformers import RobertaConfig, RobertaForMaskedLM

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "RoBERTa is pre-trained from exactly this default init; two Post-LN layers are shallow."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=66, pad_token_id=1)
    return RobertaForMaskedLM(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # ids from 3 up: no <pad>(1), so every token gets a position and attends.
    return torch.randint(3, VOCAB, (2, 16), generator=g)
