"""Pre-LN Transformer encoder: the layout that trains without warmup.

Model: identical to post_ln_transformer.py (token ids ``BATCH_SIZE`` x
``SEQ_LEN`` = 8 x 32, vocabulary 100, ``nn.Embedding(100, 64)``,
``NUM_LAYERS`` = 6 ``nn.TransformerEncoderLayer(d_model=64, nhead=4,
dim_feedforward=128, dropout=0.1, batch_first=True)``, ``nn.Linear(64, 100)``
head) except ``norm_first=True`` and a final ``nn.LayerNorm(64)`` after the
stack. LayerNorm now sits inside each residual branch, so the residual stream
is a clean identity path from the head back to the embedding.

EXPECTED DIAGNOSIS: healthy. The backward signal reaches the embedding
through the identity path with no loss (per-element delta at the embedding
output / at the last layer's output: measured 1.71; the residual stream
accumulates every branch's gradient). The last layer's gradient shrinks as
1/sqrt(L) with depth (Xiong et al.), so Adam's early updates stay small and no
warmup is needed. Measured against post_ln_transformer.py built from the same
seed (bit-identical weights): the last layer's feed-forward ``linear2``
weight-gradient norm is 1/1.7 of Post-LN's, and the per-layer norms fall
towards the output (last/first 0.5-0.7: each in-branch LayerNorm divides by the
growing residual-stream scale) where Post-LN's stay level (0.8-1.3).

Graph capture: as for the Post-LN sample, ``torch.fx.symbolic_trace`` works on
the whole model only because ``nn.TransformerEncoder`` is kept as one leaf.

Paper: Ruibin Xiong, Yunchang Yang, Di He, Kai Zheng, Shuxin Zheng, Chen
Xing, Huishuai Zhang, Yanyan Lan, Liwei Wang and Tie-Yan Liu (2020), "On Layer
Normalization in the Transformer Architecture", ICML.
docs/static-estimate.md (reference behaviour): "Pre-LN's shrinks as 1/sqrt(L) and trains without
warmup".
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
NORM_FIRST = True


class PreLNTransformer(nn.Module):
    """Same parts as the Post-LN sample; only the LayerNorm placement differs."""

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
        # The residual stream's scale grows through a Pre-LN stack; the final
        # norm puts it back to unit scale before the head, as in GPT-2.
        # enable_nested_tensor=False: PyTorch warns that it cannot use nested
        # tensors with norm_first=True anyway.
        self.encoder = nn.TransformerEncoder(
            layer,
            num_layers=NUM_LAYERS,
            norm=nn.LayerNorm(D_MODEL),
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(D_MODEL, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def build_model() -> nn.Module:
    """Seeded with the same seed as the Post-LN sample, for a like-for-like comparison."""
    torch.manual_seed(0)
    return PreLNTransformer()


def example_inputs() -> torch.Tensor:
    """The same token ids as the Post-LN sample."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=g)
