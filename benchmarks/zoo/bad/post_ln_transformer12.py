"""12-layer Post-LN Transformer encoder (the original layout): needs learning-rate warmup.

Architecture: Ashish Vaswani et al. (2017), "Attention Is All You Need",
NeurIPS, encoder side, with PyTorch's modules: token ids -> ``nn.Embedding`` ->
``nn.TransformerEncoder`` of 12 ``nn.TransformerEncoderLayer(d_model=64,
nhead=4, dim_feedforward=128, dropout=0.1, norm_first=False,
batch_first=True)`` -> ``nn.Linear(64, 512)`` per token. LayerNorm sits after
each residual addition (Post-LN), on the main path. PyTorch's default init
(``nn.TransformerEncoder`` deep-copies the layer, so the 12 layers start with
identical weights).

Sizes: vocabulary 512, d_model 64, 12 layers, sequence 16, batch 2.

What is wrong (a warning, not an error): Ruibin Xiong et al. (2020), "On
Layer Normalization in the Transformer Architecture", ICML, show that in
Post-LN the expected gradient of the parameters near the output is large and
does not shrink with depth, so Adam without warmup diverges or trains badly
(their BLEU 8.45 without warmup vs ~34 with it); Liyuan Liu et al. (2020),
"Understanding the Difficulty of Training Transformers", EMNLP, trace it to
the amplified dependence on the residual branches. The backward signal is not
vanishing or exploding at init, so the correct diagnosis is the architecture
warning GS703 (use warmup or Pre-LN), with no GS1xx/GS2xx error.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS): RMS of dLoss/d(embedding output) over RMS of
dLoss/d(output) 0.77; over the last layer's feed-forward output 0.51: no
vanishing or exploding at init.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS703",)
REASON = (
    "A 12-layer Post-LN Transformer needs learning-rate warmup (Xiong et al. 2020): an "
    "architecture warning, not a vanishing/exploding error."
)

VOCAB = 512
D_MODEL = 64
NHEAD = 4
DIM_FF = 128
NUM_LAYERS = 12
DROPOUT = 0.1
SEQ_LEN = 16


class PostLNEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            D_MODEL,
            NHEAD,
            dim_feedforward=DIM_FF,
            dropout=DROPOUT,
            norm_first=False,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, NUM_LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return PostLNEncoder().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=g)
