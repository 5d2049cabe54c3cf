"""U-Net with four down/up levels and skip concatenations (BatchNorm double convs).

Architecture: Olaf Ronneberger, Philipp Fischer and Thomas Brox (2015), "U-Net:
Convolutional Networks for Biomedical Image Segmentation", MICCAI; in the form
most PyTorch users run (e.g. the widely used milesial/Pytorch-UNet): double
3x3 conv blocks (conv + BN + ReLU, twice, padding 1 so the skip maps need no
cropping), four 2x2 max-pool downsamplings, a bottleneck double conv, four
2x2 stride-2 transposed-conv upsamplings each followed by concatenation with
the encoder map of the same level and a double conv, a 1x1 output conv to the
class maps. PyTorch's default initialisation throughout (the reference code
sets none).

Shrunk: level widths 16/32/64/128 and bottleneck 256 instead of
64/128/256/512/1024; 2 output classes; inputs 2 x 3 x 64 x 64 (four
halvings leave 4 x 4 at the bottleneck).

Expected verdict: healthy. U-Nets train from default init; the long skip
concatenations give the top encoder levels a path of four convs to the output
whatever happens in the bottleneck, and BN keeps each conv at unit scale.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(first conv
output) over RMS of dLoss/d(output) 0.66; over the last decoder conv's 1.6.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "A 4-level U-Net with BN and skip concatenations trains from PyTorch's default init "
    "(Ronneberger et al. 2015)."
)

WIDTHS = (16, 32, 64, 128, 256)
NUM_CLASSES = 2
IMAGE_SIZE = 64


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(self, widths=WIDTHS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.inc = DoubleConv(3, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1])) for i in range(4)
        )
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(4)))
        self.outc = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return UNet().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
