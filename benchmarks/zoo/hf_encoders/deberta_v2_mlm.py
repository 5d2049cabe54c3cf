"""DeBERTa-v2/v3 masked language model (Hugging Face ``DebertaV2ForMaskedLM``), shrunk.

Architecture: He et al. (2021), "DeBERTa: Decoding-enhanced BERT with
Disentangled Attention" (and DeBERTa-v3, 2021): a Post-LN encoder whose
attention adds content-to-position and position-to-content terms from shared,
log-bucketed relative position embeddings (``relative_attention``,
``pos_att_type = ["p2c", "c2p"]``, ``share_att_key``, LayerNorm'd relative
embeddings), no absolute positions, and an MLM head.

Shrunk: vocab 512, hidden 64, 2 layers, 4 heads, feed-forward 128, 32
position buckets; batch 2 x 16 tokens. The relative-attention settings are
those of microsoft/deberta-v3-base's config (the library's config defaults
turn relative attention off). Default Hugging Face init (normal(0, 0.02)),
train mode.

Why healthy: DeBERTa-v2/v3 checkpoints are pre-trained from this default init;
two Post-LN layers are shallow.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at ``deberta.embeddings.word_embeddings``' output
is 22.2x the RMS at the logits (norm ratio 7.9). The relative-position branch
(``rel_embeddings`` -> ``deberta.encoder.LayerNorm``) takes no input: it is reached
only through the attention scores, and gets 7.3e-05 of the output's RMS, the
same order as any query projection at this init (``query_proj``: 5.0e-04). That
is the usual weak gradient of attention logits at initialisation, not a
vanishing path: with AdamW (lr 1e-3) ``rel_embeddings`` moves by 46% of its norm
in 40 steps.
"""

from __future__ import annotations

import torch
from transformers import DebertaV2Config, DebertaV2ForMaskedLM

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "DeBERTa-v3 is pre-trained from this default init; two Post-LN layers are shallow."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = DebertaV2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128,
                             max_position_embeddings=64, position_biased_input=False,
                             relative_attention=True, pos_att_type=["p2c", "c2p"],
                             position_buckets=32, max_relative_positions=-1,
                             norm_rel_ebd="layer_norm", share_att_key=True)
    return DebertaV2ForMaskedLM(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 16), generator=g)
