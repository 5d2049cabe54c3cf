"""Vision Transformer classifier (Hugging Face ``ViTForImageClassification``), shrunk.

Architecture: Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words":
patch-embedding conv, [CLS] token and learned positions, Pre-LN Transformer
blocks (LayerNorm, attention, add; LayerNorm, GELU MLP, add), final LayerNorm,
linear classifier on the [CLS] token. (``ViTForImageClassification`` has no
pooler.)

Shrunk: 32 px images, patch 4 (64 patches), hidden 64, 2 layers, 4 heads,
MLP 128, 10 classes; batch 2. Default Hugging Face init (truncated
normal(0, 0.02), zero biases), train mode.

Why healthy: ViT is trained from this init; Pre-LN residual blocks keep an
identity path to the patch embedding.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at the patch-embedding conv's output is 0.0139x
the RMS at the logits (norm ratio 0.28): the logits see one token of 65, so the
per-element figure is diluted by the tokens, not lost.
"""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification

SEED = 0
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "ViT trains from this default init; Pre-LN residual blocks keep an identity path."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       num_labels=10)
    return ViTForImageClassification(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g)
