"""Swin Transformer classifier (Hugging Face ``SwinForImageClassification``), shrunk.

Architecture: Liu et al. (2021), "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows": patch embedding + LayerNorm, stages of
Pre-LN blocks with (shifted) window attention and relative position bias, patch
merging between stages, stochastic depth, final LayerNorm, average pool and a
linear classifier.

Shrunk: 32 px images, patch 2 (16 x 16 tokens), embed dim 32, depths (2, 2),
heads (2, 4), window 4, 10 classes; batch 2. Default Hugging Face init
(normal(0, 0.02)), default drop-path rate 0.1, train mode.

Why healthy: Swin is trained from this init; Pre-LN residual blocks keep an
identity path to the patch embedding.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at the patch-embedding conv's output is 0.0101x
the RMS at the logits (norm ratio 0.29), behind the average pool over 64 tokens.
The relative-position bias tables are zero-initialised by the library and take
no input: they are reached only through the attention scores and get 1.1e-05 of
the output's RMS (``q_proj`` in the same block: 3.1e-07), the usual weak
gradient of attention logits at initialisation; with AdamW (lr 1e-3) the first
table grows from 0 to norm 0.18 in 40 steps.
"""

from __future__ import annotations

import torch
from transformers import SwinConfig, SwinForImageClassification

SEED = 0
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Swin trains from this default init; Pre-LN residual blocks keep an identity path."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=32,
                        depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)
    return SwinForImageClassification(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g)
