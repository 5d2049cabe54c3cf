"""The probe on a CUDA device: runs where a GPU is present, skips cleanly elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def _assert_probe_close(cpu: gradscope.Report, gpu: gradscope.Report) -> None:
    """Every node's measured gradient RMS on the GPU within 1e-3 of the CPU's."""
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        if a.probe_grad_rms is None:
            assert b.probe_grad_rms is None
        else:
            assert b.probe_grad_rms == pytest.approx(a.probe_grad_rms, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("tracer", ["symbolic_trace", "export", "runtime"])
def test_cuda_probe_matches_cpu_and_restores_the_model(tracer: str) -> None:
    model = _model()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = gradscope.analyze(model, (x,), device="cpu", tracer=tracer)
    gpu = gradscope.analyze(model, (x,), device="cuda", tracer=tracer)
    assert gpu.model.device == "cuda"
    assert gpu.probe.device == "cuda"
    # The model came back to the CPU, unchanged (BatchNorm statistics included).
    for name, value in model.state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, before[name]), name
    _assert_probe_close(cpu, gpu)


def test_model_already_on_cuda_stays_there() -> None:
    model = _model().cuda()
    x = torch.randn(16, 32, device="cuda")
    report = gradscope.analyze(model, (x,), device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert report.probe.device == "cuda"


def test_stream_on_cuda_copies_host_blocks_and_matches_cpu() -> None:
    """--stream with real weights in host memory: blocks are copied to the GPU one at a
    time (issue 17); figures as the CPU probe's, the model left on the CPU, unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), *[nn.Sequential(nn.LayerNorm(64),
                                                             nn.Linear(64, 64), nn.Tanh())
                                                for _ in range(4)], nn.Linear(64, 10))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = gradscope.analyze(model, (x,), device="cpu", tracer="runtime")
    gpu = gradscope.analyze(model, (x,), device="cuda", stream=True)
    assert gpu.probe.device == "cuda"
    for name, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[name]), name
    _assert_probe_close(cpu, gpu)


def test_stream_draws_a_meta_model_on_cuda() -> None:
    from test_stream import _Stack

    report = gradscope.analyze(_Stack, (torch.randn(4, 8),), device="cuda", stream=True)
    assert report.probe.enabled and report.probe.device == "cuda"
    assert any(layer.probe_grad_rms for layer in report.layers)
