"""Word-level language model: embedding, 2-layer LSTM, dropout, linear decoder (pytorch/examples).

Architecture: ``RNNModel`` of pytorch/examples ``word_language_model/model.py``
(after Zaremba, Sutskever and Vinyals (2014), "Recurrent Neural Network
Regularization"), with ``rnn_type="LSTM"``: ``nn.Embedding(ntoken, ninp)``,
``Dropout``, ``nn.LSTM(ninp, nhid, nlayers=2, dropout)`` (sequence-first
layout), ``Dropout``, ``nn.Linear(nhid, ntoken)`` decoder, ``log_softmax`` over
the vocabulary. ``init_weights`` as in the example: encoder and decoder weights
``uniform_(-0.1, 0.1)``, decoder bias 0, the LSTM at PyTorch's default
(forget-gate bias ~0). The example's forward takes ``(input, hidden)``; here the
hidden state defaults to zeros (the example's ``init_hidden``) so the model can
be called on the token ids alone, and forward returns ``(log_probs, hidden)``
as the example does.

Shrunk: vocabulary 512, ninp = nhid = 64 (example default 200), dropout 0.2
(the example's default), bptt 35 steps (the example's default), batch 2;
inputs are token ids of shape 35 x 2 (time first).

Expected verdict: healthy. This is the stock PyTorch example, trained for
years by users from exactly this init on 35-step BPTT windows; the loss
reaches every step directly (one prediction per token), so nothing has to
survive 35 steps back in time to train.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(embedding
output) over RMS of dLoss/d(log-probabilities) 0.065 (the 512-way decoder with
U(-0.1, 0.1) weights and dropout); RMS of dLoss/d(embedding at step 0) over
dLoss/d(embedding at step 34) 1.9: every step has its own loss term, so nothing
decays through time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SEED = 0
EXPECT = "healthy"
REASON = (
    "pytorch/examples' word-language-model LSTM trains from its own init_weights on 35-step "
    "windows."
)

VOCAB = 512
NINP = 64
NHID = 64
NLAYERS = 2
DROPOUT = 0.2
BPTT = 35
BATCH = 2


class RNNModel(nn.Module):
    def __init__(
        self,
        ntoken: int = VOCAB,
        ninp: int = NINP,
        nhid: int = NHID,
        nlayers: int = NLAYERS,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid
        self.nlayers = nlayers
        self.init_weights()

    def init_weights(self) -> None:
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor] | None = None):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return RNNModel().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (BPTT, BATCH), generator=g)
