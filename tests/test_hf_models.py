"""Hugging Face models, built from tiny configs only (never downloaded).

GPT-2, BERT and Llama defeat ``torch.fx.symbolic_trace``; gradscope must fall
back to ``torch.export``, probe the logits, keep real module paths
("transformer.h.0.attn"), understand nearly every op, and leave the model as
it found it. Each model takes ~2 s on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.schema import validate_report

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, even by accident
transformers = pytest.importorskip("transformers")

VOCAB = 100
BATCH, SEQ = 2, 16


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=128, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


MODELS: dict[str, tuple[Callable[[], nn.Module], set[str]]] = {
    "gpt2": (gpt2, {"transformer.h.0.attn", "transformer.h.1.mlp.c_fc", "lm_head",
                    "transformer.wte", "transformer.ln_f"}),
    "bert": (bert, {"bert.embeddings.word_embeddings",
                    "bert.encoder.layer.0.attention.self.query",
                    "bert.encoder.layer.1.output.dense", "cls.predictions.transform.dense"}),
    "llama": (llama, {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                      "model.embed_tokens", "model.norm", "lm_head"}),
}


class Before:
    """The model's state before analysis, recorded with plain torch."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [(n, p, p.detach().clone(), p.requires_grad, p.grad)
                       for n, p in model.named_parameters()]
        self.buffers = [(n, b, b.clone()) for n, b in model.named_buffers()]
        self.modes = [(n, m.training) for n, m in model.named_modules()]
        self.hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks),
                       len(m._backward_hooks)) for n, m in model.named_modules()]
        self.rng = torch.get_rng_state()

    def assert_unchanged(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, p, value, flag, grad in self.params:
            assert params[n] is p and torch.equal(p.detach(), value), n
            assert p.requires_grad == flag and p.grad is grad, n
        buffers = dict(model.named_buffers())
        for n, b, value in self.buffers:
            assert buffers[n] is b and torch.equal(b, value), n
        assert [(n, m.training) for n, m in model.named_modules()] == self.modes
        assert [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                for n, m in model.named_modules()] == self.hooks
        assert torch.equal(torch.get_rng_state(), self.rng)


@pytest.fixture(scope="module")
def analysed() -> Any:
    """Build and analyse each model once for the module: (model, report, JSON, before)."""
    cache: dict[str, tuple[nn.Module, gradscope.Report, dict[str, Any], Before]] = {}

    def get(name: str) -> tuple[nn.Module, gradscope.Report, dict[str, Any], Before]:
        if name not in cache:
            torch.manual_seed(0)
            model = MODELS[name][0]()
            ids = torch.randint(0, VOCAB, (BATCH, SEQ),
                                generator=torch.Generator().manual_seed(1))
            model.eval()  # as after from_pretrained; the probe runs in train mode
            before = Before(model)
            report = gradscope.analyze(model, ids, device="cpu")
            cache[name] = (model, report, report.to_dict(), before)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_model_unchanged(analysed: Any, name: str) -> None:
    model, _, _, before = analysed(name)
    assert not model.training
    before.assert_unchanged(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_traced_with_the_recorder(analysed: Any, name: str) -> None:
    """symbolic_trace fails on every HF model; with the probe on, the runtime recorder is
    next (one forward without gradients, where torch.export cost more than a forward)."""
    _, report, doc, _ = analysed(name)
    trace = report.model.trace
    assert trace.method == "runtime"
    assert [(a.method, a.ok) for a in trace.attempts] == [("symbolic_trace", False),
                                                          ("runtime", True)]
    # the layers a user knows, with their module paths (export's nn_module_stack)
    modules = {layer.module for layer in report.layers if layer.module}
    assert len(modules) > 5
    if name == "gpt2":  # an Embedding of constant positions is a layer, not a weight
        assert "transformer.wpe" in modules
    assert trace.attempts[0].message  # why fx failed, recorded
    assert "GS801" in {f.rule for f in report.findings}
    validate_report(doc)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_probed(analysed: Any, name: str) -> None:
    _, report, _, _ = analysed(name)
    assert report.model.output == "output['logits']"
    assert report.probe.output_grad_rms is not None and report.probe.output_grad_rms > 0
    out = [layer for layer in report.layers if layer.probe_grad_rms == pytest.approx(1.0)]
    assert out and out[-1].shape == [BATCH, SEQ, VOCAB]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_coverage_and_measurements(analysed: Any, name: str) -> None:
    _, report, _, _ = analysed(name)
    trace = report.model.trace
    print(f"{name}: coverage {trace.coverage:.3f}, unknown ops: {list(trace.unknown_ops)}")
    # Measured: gpt2 1.0, bert 1.0, llama 0.986 (cos, sin of the rotary embedding).
    assert 0.8 < trace.coverage <= 1.0
    layers = report.layers
    measured = [layer for layer in layers if layer.probe_grad_rms is not None]
    # Measured: gpt2 95/128, bert 59/84, llama 117/164; the rest are integer/mask
    # and position computations that carry no gradient.
    assert len(measured) / len(layers) > 0.5, f"{len(measured)}/{len(layers)}"
    # Every layer with trainable weights gets a gradient measurement and a finite ratio.
    weighted = [layer for layer in layers if layer.param_grad_ratio is not None]
    assert len(weighted) >= 10
    for layer in weighted:
        assert layer.probe_grad_rms is not None, layer.name
        assert layer.param_grad_ratio > 0, layer.name
    assert not any(layer.nonfinite_forward or layer.nonfinite_backward for layer in layers)
    assert not {"GS501", "GS502"} & {f.rule for f in report.findings}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_module_paths(analysed: Any, name: str) -> None:
    model, report, _, _ = analysed(name)
    real = {n for n, _ in model.named_modules()}
    paths = {layer.module for layer in report.layers if layer.module}
    assert MODELS[name][1] <= paths, MODELS[name][1] - paths
    assert paths <= real, sorted(paths - real)[:5]
