"""GPT-NeoX (Black et al. 2022, "GPT-NeoX-20B"; also the Pythia suite), Hugging Face
``GPTNeoXForCausalLM`` built from a ``GPTNeoXConfig``.

Shrunk: 2 layers, width 64, 4 heads, FFN 256, vocabulary 256, 64 positions (pythia-70m: 6
layers, width 512, vocabulary 50304). Default initialisation from ``transformers``: N(0, 0.02)
linear and embedding weights, zero biases, LayerNorm 1/0. Parallel residual
(``use_parallel_residual=True``: x + attn(ln1(x)) + mlp(ln2(x))), rotary positions on a quarter
of each head (``rotary_pct=0.25``), a final LayerNorm and an untied output head.

Expected healthy: the layout GPT-NeoX-20B and every Pythia model were trained with.
"""

from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Parallel-residual pre-LN decoder at GPT-NeoX's default init, as Pythia is trained."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
