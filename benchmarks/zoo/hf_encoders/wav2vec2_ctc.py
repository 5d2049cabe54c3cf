"""wav2vec 2.0 with a CTC head (Hugging Face ``Wav2Vec2ForCTC``), shrunk, on raw audio.

Architecture: Baevski et al. (2020), "wav2vec 2.0: A Framework for
Self-Supervised Learning of Speech Representations" (base layout,
``feat_extract_norm="group"``): a 7-layer conv1d feature encoder over the
waveform (GroupNorm after the first conv, GELU), a feature projection
(LayerNorm + linear), a weight-normalised grouped convolutional position
embedding, Post-LN Transformer layers with LayerDrop, and a linear CTC head.

Shrunk: conv feature encoder width 32 (kernels and strides as in the base
model), hidden 64, 2 layers, 4 heads, ffn 128, position conv kernel 16 with 4
groups, 32 output tokens; 1 s of 16 kHz audio (49 frames); batch 2. Default
Hugging Face init, default training-time SpecAugment (``mask_time_prob``
0.05, at least 2 masks of 10 frames; drawn with numpy's global generator) and
LayerDrop 0.1, train mode.

Why healthy: fine-tuning wav2vec 2.0 with CTC, and pre-training it, starts
from this init and this architecture.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at the first feature-encoder conv's output is
0.022x the RMS at the logits (norm ratio 0.18), behind the 320x downsampling of
the conv stack. The feature encoder sets ``requires_grad = True`` on
``input_values[:, None]`` in train mode, which raises if the waveform itself
requires grad (it is then not a leaf).
"""

from __future__ import annotations

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

SEED = 0
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "wav2vec 2.0 is pre-trained and CTC-fine-tuned from this default init and layout."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4)
    return Wav2Vec2ForCTC(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16000, generator=g)
