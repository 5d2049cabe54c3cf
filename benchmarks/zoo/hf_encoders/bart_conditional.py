"""BART encoder-decoder (Hugging Face ``BartForConditionalGeneration``), shrunk.

Architecture: Lewis et al. (2020), "BART: Denoising Sequence-to-Sequence
Pre-training": a Post-LN encoder and decoder with learned positions (offset 2),
LayerNorm on the embeddings, GELU feed-forward, cross-attention, and an LM head
tied to the shared embedding plus ``final_logits_bias``.

Shrunk: vocab 512, d_model 64, 4 heads, ffn 128, 2 encoder + 2 decoder
layers, 64 positions; batch 2, 16 source and 8 target tokens. Default Hugging
Face init (normal(0, 0.02)), train mode (dropout 0.1).

Inputs are positional in ``forward``'s order: ``input_ids``,
``attention_mask`` (all ones), ``decoder_input_ids``.

Why healthy: BART is pre-trained from this default init; two Post-LN layers
per stack are shallow.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``model.encoder.embed_tokens``' (first, encoder)
output is 0.107x the RMS at the logits (norm ratio 0.054); the encoder is reached
only through cross-attention.
"""

from __future__ import annotations

import torch
from transformers import BartConfig, BartForConditionalGeneration

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "BART is pre-trained from exactly this default init; two Post-LN layers per stack."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)
    return BartForConditionalGeneration(config).train()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # ids from 3 up: no <s>(0), <pad>(1) or </s>(2) inside the sequences.
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=g)
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    decoder_input_ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    return input_ids, attention_mask, decoder_input_ids
