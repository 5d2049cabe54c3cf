"""CLIP text-image model (Hugging Face ``CLIPModel``), shrunk; output ``logits_per_image``.

Architecture: Radford et al. (2021), "Learning Transferable Visual Models From
Natural Language Supervision": a Pre-LN ViT image tower (patch conv, class
token, positions, pre-LayerNorm) and a Pre-LN causal Transformer text tower
(QuickGELU MLPs), each pooled (class token / end-of-text token), projected
without bias, L2-normalised, and compared by a dot product scaled by
``exp(logit_scale)`` (init log(1/0.07)).

Shrunk: text vocab 512, 16 tokens, hidden 64, 2 layers, 4 heads, MLP 128;
vision 32 px, patch 4, hidden 64, 2 layers, 4 heads, MLP 128; projection 32;
batch 2 image-text pairs. Default Hugging Face init (CLIP's factor-scaled
normals), train mode.

Inputs are positional in ``forward``'s order: ``input_ids``, ``pixel_values``.
The model returns a ``CLIPOutput`` whose first floating entry is
``logits_per_image`` (2 x 2): that is what is differentiated, the quantity the
contrastive loss is computed on.

Why healthy: CLIP is trained from this default init; both towers are Pre-LN
residual stacks.

Measured (plain autograd, loss <logits_per_image, seeded direction>, example
batch): the vision tower runs first; the per-element RMS of the gradient at the
patch-embedding conv's output is 0.043x the RMS at the logits (norm ratio 1.9);
at the class token (``class_embedding`` expanded) 4.3x (norm ratio 24), at the
text token embedding 4.2x (norm ratio 96). The norm ratios are large because the
output holds only 4 numbers, scaled by exp(logit_scale) = 14.3 after an L2
normalisation; per element nothing grows by more than a few times.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "CLIP is trained from this default init; both towers are Pre-LN residual stacks."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=4, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=32)
    return CLIPModel(config).train()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    pixel_values = torch.randn(2, 3, 32, 32, generator=g)
    return input_ids, pixel_values
