"""T5 encoder-decoder (Hugging Face ``T5ForConditionalGeneration``), shrunk.

Architecture: Raffel et al. (2020), "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer": Pre-LN (RMSNorm, no bias)
encoder and decoder with relative position buckets, ReLU feed-forward, cross-
attention, and an LM head tied to the shared embedding (output rescaled by
d_model ** -0.5).

Shrunk: vocab 512, d_model 64, d_kv 16, 4 heads, d_ff 128, 2 encoder + 2
decoder layers; batch 2, 16 source and 8 target tokens. Default Hugging Face
init (T5's factor-scaled normal: embeddings std 1, projections std
(fan_in)^-0.5 and (d_model * d_kv)^-0.5 for the attention output), train mode.

Inputs are positional in ``forward``'s order: ``input_ids``,
``attention_mask`` (all ones), ``decoder_input_ids``.

Why healthy: T5 is pre-trained from this default init; Pre-LN blocks keep an
identity path from the logits back to the embedding.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``encoder.embed_tokens``' (first) output is
1.40x the RMS at the logits (norm ratio 0.70). The relative-position bucketing
(``T5Attention._relative_position_bucket``) takes ``log`` of integer distances
that include 0, so it holds -inf, but ``torch.where`` discards those entries and
the path is integer (no gradient): logits and every gradient are finite.
"""

from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "T5 is pre-trained from exactly this default init; Pre-LN keeps an identity path."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).train()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (2, 16), generator=g)
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    decoder_input_ids = torch.randint(2, VOCAB, (2, 8), generator=g)
    return input_ids, attention_mask, decoder_input_ids
