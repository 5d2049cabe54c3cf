"""Post-LN Transformer encoder: trains only with learning-rate warmup.

Model: token ids (``BATCH_SIZE`` x ``SEQ_LEN`` = 8 x 32, vocabulary
``VOCAB_SIZE`` = 100) -> ``nn.Embedding(100, 64)`` -> ``nn.TransformerEncoder``
of ``NUM_LAYERS`` = 6 ``nn.TransformerEncoderLayer(d_model=64, nhead=4,
dim_feedforward=128, dropout=0.1, norm_first=False, batch_first=True)`` ->
``nn.Linear(64, 100)`` head per token. This is the original "Attention Is All
You Need" layout: LayerNorm sits after each residual addition, on the main
path, so every backward step goes through a LayerNorm.

EXPECTED DIAGNOSIS: architecture warning (Post-LN: recommend learning-rate
warmup, or Pre-LN), not a vanishing/exploding error: the backward signal is
well scaled (per-element delta at the embedding output / at the last layer's
output: measured 0.76). What differs from Pre-LN is where the gradient lands.
Xiong et al. show the last layer's gradient is O(1) in depth for Post-LN and
O(1/sqrt(L)) for Pre-LN; with Adam and no warmup, the large early updates
to the layers near the output destabilise training. Measured here against
pre_ln_transformer.py built from the same seed (bit-identical weights): the
last layer's feed-forward ``linear2`` weight-gradient norm is 1.7x Pre-LN's
(theory sqrt(6) = 2.4), and its last/first-layer ratio is 0.8-1.3 against
Pre-LN's 0.5-0.7 (over dropout and loss-direction seeds). Weaker than the
paper's picture: at 6 layers of width 64 the Post-LN per-layer profile is
U-shaped (e.g. 467, 358, 314, 303, 327, 375), not the steady rise towards the
output of the paper's Figure 3.

Graph capture: ``torch.fx.symbolic_trace`` on this model succeeds, but only
because fx treats ``nn.TransformerEncoder`` (a torch.nn module) as one opaque
leaf; tracing the encoder or one of its layers directly fails inside
PyTorch's fast-path checks (``RuntimeError: input to _none_or_dtype() must be
None or torch.Tensor``). A graph-based tool sees ``encoder`` as a single node
unless it hooks the layers in eager mode.

Also worth knowing: ``nn.TransformerEncoder`` deep-copies its layer, so all six
layers start from identical weights (stock PyTorch behaviour, kept here).

Paper: Ruibin Xiong, Yunchang Yang, Di He, Kai Zheng, Shuxin Zheng, Chen
Xing, Huishuai Zhang, Yanyan Lan, Liwei Wang and Tie-Yan Liu (2020), "On Layer
Normalization in the Transformer Architecture", ICML.
docs/static-estimate.md (reference behaviour): "Post-LN's last-layer gradient does not shrink with
depth and Post-LN needs learning-rate warmup (BLEU 8.45 without warmup vs
~34 with 4000 warmup steps)".
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB_SIZE = 100
D_MODEL = 64
NHEAD = 4
DIM_FEEDFORWARD = 128
NUM_LAYERS = 6
DROPOUT = 0.1
SEQ_LEN = 32
BATCH_SIZE = 8
NORM_FIRST = False


class PostLNTransformer(nn.Module):
    """Embedding, a stock encoder stack and a per-token head: the whole model is stock parts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            d_model=D_MODEL,
            nhead=NHEAD,
            dim_feedforward=DIM_FEEDFORWARD,
            dropout=DROPOUT,
            batch_first=True,
            norm_first=NORM_FIRST,
        )
        # nn.TransformerEncoder deep-copies the layer NUM_LAYERS times, so all
        # layers start from identical weights: stock PyTorch behaviour, kept.
        # Nested tensors only matter for padded inputs on the inference fast path.
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=NUM_LAYERS, enable_nested_tensor=False
        )
        self.head = nn.Linear(D_MODEL, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def build_model() -> nn.Module:
    """Seeded, so two builds give bit-identical parameters."""
    torch.manual_seed(0)
    return PostLNTransformer()


def example_inputs() -> torch.Tensor:
    """Integer token ids: exercises a non-float input that must not get a gradient."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=g)
