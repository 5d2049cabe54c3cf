"""Mamba (Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces"), Hugging Face ``MambaForCausalLM`` built from a ``MambaConfig``.

Shrunk: 2 blocks, width 64 (inner width 128 with ``expand=2``), SSM state 8, causal conv of
width 4, vocabulary 256 (mamba-130m: 24 blocks, width 768, state 16, vocabulary 50280).
Without the ``mamba_ssm``/``causal_conv1d`` CUDA kernels ``transformers`` runs its slow
reference path (a Python loop over the 16 time steps), hence the tiny sizes. Default
initialisation from ``transformers``: N(0, 0.1) (``initializer_range``) for the tied
embedding/output head, Mamba's S4D-real A_log = log(1..N), D at 1, dt_proj weight uniform in
+-dt_rank^-0.5 and its bias the inverse softplus of a log-uniform dt in [1e-3, 1e-1], conv and
out_proj at PyTorch's kaiming-uniform default (``rescale_prenorm_residual`` is off by
default), RMSNorm at 1.

Expected healthy: pre-RMSNorm residual blocks around the selective SSM, with the init of the
paper, which is how the released Mamba models were trained; the residual stream carries the
gradient to the embedding.
"""

from __future__ import annotations

import torch
from transformers import MambaConfig, MambaForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-RMSNorm residual selective-SSM stack with the Mamba paper's init, as released."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2,
                         expand=2, conv_kernel=4, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    return MambaForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
