"""BERT sequence classifier (Hugging Face ``BertForSequenceClassification``), shrunk.

Architecture: Devlin et al. (2019), "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding": the Post-LN encoder of ``bert_mlm`` with
the fine-tuning head: the pooler (dense + tanh on the [CLS] token) and a linear
classifier. Every GLUE fine-tuning script builds this.

Shrunk: vocab 512, hidden 64, 4 layers, 4 heads, feed-forward 128, 64 positions,
3 labels; batch 2 x 24 tokens. Default Hugging Face init (normal(0, 0.02) weights,
zero biases, unit LayerNorm), train mode (dropout 0.1 on).

Why healthy: fine-tuning starts from pre-trained weights, but the head and the
architecture train from this init too (BERT pre-training starts here); the readout
takes one token, and attention hands its gradient to the others.

Measured (plain autograd, loss <logits, seeded direction>, example batch, train
mode): the norm of the gradient at the word embeddings' output is 0.83 of the norm
at the logits.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

SEED = 0
VOCAB = 512
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "BertForSequenceClassification at the init BERT is trained from; four Post-LN layers."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 24), generator=g)
