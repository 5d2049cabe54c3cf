"""Whisper speech-to-text model (Hugging Face ``WhisperForConditionalGeneration``), shrunk.

Architecture: Radford et al. (2022), "Robust Speech Recognition via
Large-Scale Weak Supervision": an encoder of two GELU conv1d layers (the second
stride 2) over log-mel features, sinusoidal positions, Pre-LN Transformer
blocks and a final LayerNorm; a Pre-LN decoder with learned positions,
cross-attention and an output projection tied to the token embedding.

Shrunk: 16 mel bins, 64 input frames (32 encoder positions), d_model 64, 4
heads, ffn 128, 2 encoder + 2 decoder layers, vocab 512, 8 target tokens;
batch 2. Default Hugging Face init (normal(0, 0.02); sinusoidal encoder
positions), train mode.

Inputs are positional in ``forward``'s order: ``input_features`` (2 x 16 x 64),
``attention_mask`` (all ones; Whisper's encoder does not use it),
``decoder_input_ids``.

Why healthy: Whisper is trained from this default init; both stacks are Pre-LN
residual Transformers.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``model.encoder.conv1``'s output is 0.0033x
the RMS at the logits (norm ratio 0.0033, same element count). The encoder is
reached only through cross-attention, whose value and output projections have
std 0.02 (backward gain about 0.16 each at width 64), and then through conv2 at
std 0.02: the encoder's gradient is small at this init, but Adam rescales it;
with AdamW (lr 1e-3) ``conv1.weight`` moves by 30% of its norm in 40 steps while
the loss falls from 6.2 to 2.1.
"""

from __future__ import annotations

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

SEED = 0
VOCAB = 512
MELS = 16
FRAMES = 64
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Whisper is trained from this default init; both stacks are Pre-LN residual Transformers."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=MELS, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, d_model=64, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=FRAMES // 2,
                           max_target_positions=32, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, decoder_start_token_id=0,
                           suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(config).train()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_features = torch.randn(2, MELS, FRAMES, generator=g)
    attention_mask = torch.ones(2, FRAMES, dtype=torch.long)
    decoder_input_ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    return input_features, attention_mask, decoder_input_ids
