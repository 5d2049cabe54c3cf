"""OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models"), Hugging
Face ``OPTForCausalLM`` built from an ``OPTConfig``.

Shrunk: 2 decoder layers, width 64, 4 heads, FFN 256, vocabulary 256, 64 positions (OPT-125m:
12 layers, width 768, vocabulary 50272). Default initialisation from ``transformers``:
N(0, 0.02) linear and embedding weights (``init_std``), zero biases, LayerNorm 1/0; learned
positional embedding with OPT's offset of 2; pre-LN (``do_layer_norm_before=True``), ReLU FFN,
final LayerNorm, tied output embedding.

Expected healthy: this is the pre-LN GPT-style decoder the OPT models (125m to 175B) were
trained as; the residual stream carries the gradient to the embedding unattenuated.
"""

from __future__ import annotations

import torch
from transformers import OPTConfig, OPTForCausalLM

SEED = 0
VOCAB = 256
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "Pre-LN residual decoder with OPT's default N(0, 0.02) init, the way OPT was trained."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                       num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return OPTForCausalLM(config).train()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
