"""``nn.Transformer`` encoder-decoder (Post-LN), as in PyTorch's translation tutorial.

Architecture: Ashish Vaswani et al. (2017), "Attention Is All You Need", NeurIPS:
token embeddings scaled by sqrt(d) plus sinusoidal positions, ``nn.Transformer``
(Post-LN, its default) with a causal target mask, ``nn.Linear`` generator over the
target vocabulary; the tutorial re-draws every matrix with ``xavier_uniform_``
(``for p in model.parameters(): if p.dim() > 1: xavier_uniform_(p)``).

Shrunk: vocabularies 256, width 64, 4 heads, feed-forward 128, 2 encoder and 2
decoder layers, dropout 0.1, source 24 and target 16 tokens; inputs token ids
2 x 24 and 2 x 16.

Expected verdict: healthy. The tutorial model trains (Post-LN at this depth needs no
more than the usual warmup, a GS703-style note is fair); the encoder reaches the loss
only through the decoder's cross-attention, whose value path averages over the source
tokens by design.

Measured with plain autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, train mode): the norm of dLoss/d(source embedding output) is 1.8 of the
norm at the output (before the sqrt(d) scale); gradscope's probe reads 5.68 at the
source embedding once cross-attention's mean over the source tokens is discounted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "PyTorch's translation-tutorial nn.Transformer (2+2 Post-LN layers, Xavier init) trains "
    "(Vaswani et al. 2017)."
)

VOCAB, WIDTH, HEADS, FFN, SRC, TGT = 256, 64, 4, 128, 24, 16


def sinusoid(length: int, width: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(VOCAB, WIDTH)
        self.tgt_embed = nn.Embedding(VOCAB, WIDTH)
        self.register_buffer("position", sinusoid(64, WIDTH))
        self.transformer = nn.Transformer(WIDTH, HEADS, 2, 2, FFN, dropout=0.1,
                                          batch_first=True)
        self.generator = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(TGT))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(WIDTH)
        s = self.src_embed(src) * scale + self.position[: src.shape[1]]
        t = self.tgt_embed(tgt) * scale + self.position[: tgt.shape[1]]
        return self.generator(self.transformer(s, t, tgt_mask=self.mask))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return Seq2Seq().train()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, VOCAB, (2, SRC), generator=g),
            torch.randint(0, VOCAB, (2, TGT), generator=g))
