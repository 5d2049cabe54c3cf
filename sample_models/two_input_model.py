"""Two-input model (image + vector) returning a dict: exercises loading, not pathology.

Model: an image branch (``IMAGE_SHAPE`` = 3 x 8 x 8; two 3x3 convs, 16
channels, ReLU, global average pool -> 16 features) and a vector branch
(``VECTOR_FEATURES`` = 12 -> ``nn.Linear`` -> 32, ReLU), concatenated (48) ->
``nn.Linear(48, 64)`` + ReLU (the ``"features"``) -> ``nn.Linear(64, 10)``
(the ``"logits"``). Kaiming init (fan_in, ReLU), zero biases. ``forward(image,
vector)`` takes two positional float tensors and returns
``{"logits": ..., "features": ...}``.

EXPECTED DIAGNOSIS: healthy. Both inputs get finite, non-zero gradients and
the per-element backward signal at each branch's output (the concat's inputs)
is within a few times of the signal at the features (measured 1.32 for the
image branch, 1.26 for the vector branch; concat hands each input its own
slice). Behind the global average pool the per-element signal at the first
conv is 1/64 of it (measured 0.015): that is pooling over 64 pixels, not
vanishing, and a tool should not call it vanishing. A loader has to pass two
inputs (``example_inputs()`` returns a tuple, or ``--input-shape`` twice) and
pick ``"logits"`` (or reduce over every float output) to build a loss.

Papers: Kaiming He et al. (2015), "Delving Deep into Rectifiers" (the init);
docs/static-estimate.md (reference behaviour): "concat | each input keeps its slice | 0.985".
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_CHANNELS = 3
IMAGE_SIZE = 8
IMAGE_SHAPE = (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
CONV_CHANNELS = 16
VECTOR_FEATURES = 12
VECTOR_HIDDEN = 32
FEATURES = 64
NUM_CLASSES = 10
BATCH_SIZE = 8


class ImageVectorModel(nn.Module):
    """Two branches merged by concat: the shape of many multimodal heads."""

    def __init__(self) -> None:
        super().__init__()
        self.image_branch = nn.Sequential(
            nn.Conv2d(IMAGE_CHANNELS, CONV_CHANNELS, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.vector_branch = nn.Sequential(nn.Linear(VECTOR_FEATURES, VECTOR_HIDDEN), nn.ReLU())
        self.fuse = nn.Sequential(nn.Linear(CONV_CHANNELS + VECTOR_HIDDEN, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, NUM_CLASSES)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        merged = torch.cat([self.image_branch(image), self.vector_branch(vector)], dim=1)
        features = self.fuse(merged)
        return {"logits": self.head(features), "features": features}


def build_model() -> nn.Module:
    """Seeded so two builds are bit-identical."""
    torch.manual_seed(0)
    return ImageVectorModel()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two positional inputs, in ``forward``'s order: (image, vector)."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(BATCH_SIZE, *IMAGE_SHAPE, generator=g)
    vector = torch.randn(BATCH_SIZE, VECTOR_FEATURES, generator=g)
    return image, vector
