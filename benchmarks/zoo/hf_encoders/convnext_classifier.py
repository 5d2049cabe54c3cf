"""ConvNeXt classifier (Hugging Face ``ConvNextForImageClassification``), shrunk.

Architecture: Liu et al. (2022), "A ConvNet for the 2020s": a 4x4 stride-4
patchify stem + LayerNorm, stages of residual blocks (7x7 depthwise conv,
LayerNorm, 4x pointwise expansion with GELU, pointwise projection, layer scale
initialised to 1e-6, stochastic depth), LayerNorm + strided-conv downsampling
between stages, global average pool, LayerNorm, linear classifier.

Shrunk: 32 px images, 2 stages with widths (32, 64) and depths (2, 2), 10
classes; batch 2. Default Hugging Face init (normal(0, 0.02)), layer scale
1e-6, train mode.

Why healthy: ConvNeXt trains from this init. The 1e-6 layer scale makes each
residual branch nearly silent at the start, so the gradient reaches the stem
through the identity paths; the branches themselves still get gradient,
scaled by 1e-6 (a deliberate choice of the paper, after CaiT).

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at the stem's output is 0.064x the RMS at the
logits (norm ratio 0.91), behind the average pool over 16 positions. Every
parameter inside a residual branch gets its gradient times the 1e-6 layer scale
(||grad W||/||W|| around 1e-9 to 1e-6 there); with AdamW (lr 1e-3) the first
block's ``pwconv1`` still moves by 56% of its norm in 40 steps.
"""

from __future__ import annotations

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

SEED = 0
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "ConvNeXt trains from this default init; identity paths carry the gradient to the stem."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[32, 64],
                            depths=[2, 2], image_size=32, num_labels=10)
    return ConvNextForImageClassification(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g)
