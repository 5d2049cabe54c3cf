"""A trace must not keep the forward's activations alive (issue 15).

The probe runs right after the trace: every activation the trace still holds is memory
the probe's own forward must take in fresh pages beside it (173 MB on a 6-layer GPT-2,
which cost more than the probe's bookkeeping). Checked with garbage collection off, so
that values kept by a reference cycle until the next collection count as kept.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from gradscope.tracing import trace_model


class _Branchy(nn.Module):
    """Data-dependent control flow: only the runtime recorder traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if float(h.mean()) > -1.0:
            h = torch.tanh(self.b(h))
        return h


def _models() -> list[tuple[str, nn.Module, str]]:
    mlp = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 4))
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return [("mlp", mlp, "symbolic_trace"), ("branchy", _Branchy(), "runtime"),
            ("encoder", encoder, "runtime")]


def _input(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(8, 6, 32) if name == "encoder" else torch.randn(8, 32)


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("name,model,method", _models(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_trace_keeps_no_activation(name: str, model: nn.Module, method: str,
                                   no_gc: None) -> None:
    x = _input(name)
    outputs: list[weakref.ref[torch.Tensor]] = []

    def grab(_module: nn.Module, _args: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(weakref.ref(out))

    handles = [m.register_forward_hook(grab) for m in model.modules() if m is not model]
    try:
        traced = trace_model(model, (x,), method=method)
    finally:
        for handle in handles:
            handle.remove()
    assert traced.method == method
    assert outputs, "the trace ran no module forward: nothing was checked"
    alive = [ref() for ref in outputs if ref() is not None]
    assert not alive, f"{len(alive)} of {len(outputs)} module outputs outlive the trace"


@pytest.mark.parametrize("name,model,method", _models(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_probe_run_keeps_no_activation(name: str, model: nn.Module, method: str,
                                       no_gc: None) -> None:
    """A probe batch's replay lets the model's output go with the caller's reference."""
    x = _input(name)
    traced = trace_model(model, (x,), method=method)
    seen: list[str] = []
    out = traced.runner.run((x.clone().requires_grad_(True),),
                            lambda node, _value: seen.append(node))
    assert seen and out.requires_grad
    ref = weakref.ref(out)
    del out
    assert ref() is None, "the replay keeps the model's output (and its autograd graph)"
