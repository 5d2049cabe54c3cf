"""Small real training set-ups shared by the in-process integration tests and the workers
that run the same frameworks under torchrun (no pytest import: the workers load it too)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def stdlib_lm(width: int = 32) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """A tiny GPT-2 (seeded) and the characters of a standard-library source file as its
    language-modelling set: real text, no download."""
    import transformers

    text = inspect.getsource(json.decoder)
    ids = [min(ord(c), 127) for c in text]
    data = [{"input_ids": torch.tensor(ids[i:i + width]),
             "labels": torch.tensor(ids[i:i + width])}
            for i in range(0, len(ids) - width, width)]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=width, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0))
    return model, data


def digits_module(pl: Any, net: nn.Module,
                  optimizer: Callable[[Any], torch.optim.Optimizer]) -> Any:
    """A LightningModule classifying digits with ``net``, keeping each batch's loss and each
    optimizer step's gradient norm (what Lightning itself saw) for the tests to compare."""

    class Digits(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.batch_losses: list[float] = []
            self.step_norms: list[float] = []

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)  # type: ignore[no-any-return]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.batch_losses.append(float(loss.detach()))
            return loss

        def on_before_optimizer_step(self, opt: Any) -> None:
            # the step's gradients, seen by Lightning between the backward and the update
            norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
            self.step_norms.append(float(torch.linalg.vector_norm(torch.stack(norms))))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer(self.parameters())

    return Digits()
