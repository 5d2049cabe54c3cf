"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"),
Hugging Face ``GPT2LMHeadModel`` (GPT-2's causal-LM class) built from a ``GPT2Config``.

Shrunk: 2 blocks, width 64, 4 heads, vocabulary 256, 64 positions (GPT-2 small: 12 blocks,
width 768, vocabulary 50257). Default initialisation as ``transformers`` gives it: N(0, 0.02)
for the linear and embedding weights, residual output projections scaled by 1/sqrt(2 n_layer),
LayerNorm at 1/0. Learned positional embedding, tied input/output embedding.

Expected healthy: pre-LayerNorm residual blocks with a final LayerNorm are the standard
recipe that GPT-2 and its many reproductions (nanoGPT, the HF examples) train from this very
init; the residual stream keeps the input gradient close to the output one.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-LN residual transformer with GPT-2's default init: the recipe GPT-2 was trained with."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
