"""M5: a 1-D convolutional audio classifier on raw waveforms with BatchNorm.

Architecture: Wei Dai, Chia Dai, Shuhui Qu, Juncheng Li and Samarjit Das (2017),
"Very Deep Convolutional Neural Networks for Raw Waveforms", ICASSP (M5), as in
torchaudio's speech-command tutorial: Conv1d(1, 32, 80, stride 16) - BN - ReLU -
MaxPool(4), then three Conv1d(3) - BN - ReLU - MaxPool(4) stages (32, 64, 64
channels), global average pooling, Linear to the classes. PyTorch's default init.

Shrunk: 8000-sample waveforms (half a second at 16 kHz), 35 classes; inputs
2 x 1 x 8000.

Expected verdict: healthy. The tutorial trains it to ~85% on Speech Commands from
this init; BatchNorm after every convolution keeps the signal normalised.

Measured with plain autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, BatchNorm in train mode): the norm of dLoss/d(first convolution's output)
is 1.62 of the norm at the output; gradscope's probe, pooling discounted, reads 3.1.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "M5 (1-D conv + BatchNorm on raw audio) trains from PyTorch's default init (Dai et al. "
    "2017)."
)


class M5(nn.Module):
    def __init__(self, classes: int = 35, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 80, stride=16), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.MaxPool1d(4),
            nn.Conv1d(channels, channels, 3), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.MaxPool1d(4),
            nn.Conv1d(channels, 2 * channels, 3), nn.BatchNorm1d(2 * channels), nn.ReLU(),
            nn.MaxPool1d(4),
            nn.Conv1d(2 * channels, 2 * channels, 3), nn.BatchNorm1d(2 * channels), nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(x.mean(dim=-1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return M5().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 8000, generator=g)
