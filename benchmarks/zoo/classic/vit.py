"""Vision Transformer (Pre-LN encoder, class token) with torchvision's init, zero-initialised head.

Architecture: Alexey Dosovitskiy et al. (2021), "An Image is Worth 16x16
Words: Transformers for Image Recognition at Scale", ICLR; written after
torchvision's ``VisionTransformer``: patch embedding by a stride-p conv, a
learned class token and position embedding, Pre-LN encoder blocks (LayerNorm,
multi-head self-attention, residual; LayerNorm, MLP Linear-GELU-Linear,
residual), a final LayerNorm, a Linear head on the class token.
Initialisation as torchvision's: patch conv ``trunc_normal_(std=sqrt(1/fan_in))``
bias 0, class token 0, position embedding ``normal_(std=0.02)``, attention at
``nn.MultiheadAttention``'s own init, MLP Linears ``xavier_uniform_`` with biases
``normal_(std=1e-6)``, and the classification head weight AND bias zero
(torchvision's ``heads.head``, as in the paper's fine-tuning recipe).

Shrunk: 32 x 32 images with 4 x 4 patches (64 tokens + class token), hidden
64, 4 layers, 4 heads, MLP 128, dropout 0, 10 classes; inputs 2 x 3 x 32 x 32.

Expected verdict: healthy. ViT trains from this init. Because the head is
zero, the gradient reaching every layer below it is exactly 0 at step 0
(dLoss/d(features) = W_head^T dLoss/d(logits) = 0): only the head gets a
gradient on the first step, after which the signal flows. This is a deliberate
design (zero-initialised classifiers; also Goyal et al. 2017, Fixup), not
vanishing: a correct tool should not call it a vanishing gradient.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(patch-
embedding output) over RMS of dLoss/d(output) exactly 0 (the zero head); with
the head re-drawn at nn.Linear's default init the same figure is 0.025, over a
64-wide class-token feature read by 10 logits and 65 tokens of which only the
class token reaches the head directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "torchvision's ViT zero-initialises its head on purpose; it trains, the zero gradient below"
    " the head lasts one step."
)

IMAGE_SIZE = 32
PATCH = 4
HIDDEN = 64
LAYERS = 4
HEADS = 4
MLP_DIM = 128
NUM_CLASSES = 10


class MLPBlock(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Linear(HIDDEN, MLP_DIM),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(MLP_DIM, HIDDEN),
            nn.Dropout(0.0),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(HIDDEN, HEADS, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.mlp = MLPBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, HIDDEN, PATCH, stride=PATCH)
        seq_len = (IMAGE_SIZE // PATCH) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, HIDDEN).normal_(std=0.02))
        self.layers = nn.Sequential(*[EncoderBlock() for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.head = nn.Linear(HIDDEN, num_classes)
        fan_in = 3 * PATCH * PATCH
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.head(x[:, 0])


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return VisionTransformer().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
