"""Optimizer-aware verdicts (issue 14, item 2): what Adam rescales is not judged as SGD.

The absolute weight-gradient scale the verdict reads (``ProbeResult.param_grad_rms``) is
checked against a brute-force autograd computation, on the user's loss and on the
synthetic loss rescaled to a mean cross-entropy; the verdicts on models whose training
outcome under Adam is known from docs/trainability.md (a 5-layer sigmoid MLP trains, a
20-layer default-init ReLU MLP does not).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sklearn import datasets  # the test extra: a missing install fails, never skips
from torch import nn

import gradscope
from gradscope.probe import ProbeResult, run_probe
from gradscope.rules.optimizers import ADAM_EPS, ASSUMED_NOTE
from gradscope.tracing import trace_model


def _digits(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    return [(x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64]) for i in range(count)]


def _mlp(depth: int, act: type[nn.Module], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan = 64
    for _ in range(depth - 1):
        layers += [nn.Linear(fan, 128), act()]
        fan = 128
    layers.append(nn.Linear(fan, 10))
    return nn.Sequential(*layers)


def _loss(output: torch.Tensor, inputs: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def _analyse(model: nn.Module, **options: Any) -> gradscope.Report:
    batches = _digits()
    return gradscope.analyze(model, (batches[0][0],), device="cpu", loss=_loss,
                             example_batches=[((x,), y) for x, y in batches], **options)


def _probe(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]] | None,
           **options: Any) -> tuple[ProbeResult, dict[str, str]]:
    """The probe's result on ``model`` and each weight node's module name."""
    x = (data or _digits(1))[0][0]
    traced = trace_model(model, (x,))
    real = [((bx,), by) for bx, by in data] if data else None
    result = run_probe(model, traced, (x,), "cpu", real_batches=real, **options)
    return result, {n: str(traced.node(n).module) for n in result.param_grad_rms}


def _codes(report: gradscope.Report) -> dict[str, str]:
    return {f.rule: f.severity for f in report.findings}


def test_param_grad_rms_matches_autograd_on_the_users_loss() -> None:
    """The probe's per-element RMS is sqrt(mean over batches of mean(g^2)), per weight."""
    model = _mlp(4, nn.Sigmoid)
    batches = _digits()
    probe, modules = _probe(model, batches, loss=_loss, batches=3)
    sq: dict[str, list[float]] = {}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                assert module.weight.grad is not None
                sq.setdefault(name, []).append(float(module.weight.grad.pow(2).sum()))
    model.zero_grad()
    measured = {modules[n]: v for n, v in probe.param_grad_rms.items()}
    for name, values in sq.items():
        numel = model.get_submodule(name).weight.numel()
        expected = math.sqrt(sum(values) / len(values) / numel)
        assert measured[name] == pytest.approx(expected, rel=1e-4), name


def test_synthetic_loss_is_rescaled_to_a_mean_cross_entropy() -> None:
    """Without a loss_fn the scale is that of a mean CE at chance: 1/(rows sqrt(classes))."""
    model = _mlp(3, nn.ReLU)
    probe, modules = _probe(model, None, batches=1)
    assert probe.output_grad_rms
    scale = 1.0 / (64 * math.sqrt(10)) / probe.output_grad_rms
    for node, rms in probe.param_grad_rms.items():
        norm = probe.param_grad_norm[node]
        assert rms is not None and norm is not None
        module = model.get_submodule(modules[node])
        assert rms == pytest.approx(norm / math.sqrt(module.weight.numel()) * scale, rel=1e-6)
    assert "rescaled to a mean cross-entropy over 64 rows of 10" in probe.grad_scale


def test_adam_rescales_a_vanishing_gradient_above_its_eps() -> None:
    """A 5-layer sigmoid MLP: an error for SGD, information for Adam (it trains: 0.74-0.83)."""
    sgd = _codes(_analyse(_mlp(5, nn.Sigmoid), optimizer="sgd", lr=0.1))
    adam = _analyse(_mlp(5, nn.Sigmoid), optimizer="adam", lr=1e-3)
    assert sgd.get("GS102") == "error"
    assert _codes(adam).get("GS102") == "info"
    finding = next(f for f in adam.findings if f.rule == "GS102")
    assert finding.evidence["gradient_rms_per_element"] > ADAM_EPS  # type: ignore[operator]
    assert "rescaled" in finding.message
    assert adam.status != "unhealthy"


def test_adam_cannot_rescale_a_gradient_below_its_eps() -> None:
    """A 20-layer default-init ReLU MLP: first layers' gradient ~1e-9 per element, an error."""
    report = _analyse(_mlp(20, nn.ReLU), optimizer="adam", lr=1e-3)
    finding = next(f for f in report.findings if f.rule == "GS102")
    assert finding.severity == "error"
    assert finding.evidence["gradient_rms_per_element"] < ADAM_EPS  # type: ignore[operator]
    assert "eps" in finding.message


def test_exploding_gradient_is_information_under_adam() -> None:
    """Weights of std 1 whatever the fan-in: SGD at 0.1 goes NaN, Adam trains (0.75)."""
    torch.manual_seed(0)
    model = _mlp(6, nn.ReLU)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1)
                m.bias.zero_()
    sgd_report = _analyse(model, optimizer="sgd", lr=0.1)
    sgd = _codes(sgd_report)
    adam = _codes(_analyse(model, optimizer="adam", lr=1e-3))
    assert sgd.get("GS202") == "error"
    assert adam.get("GS202") == "info"
    # The range test measured the divergence on the user's data: an error of its own.
    [lr_finding] = [f for f in sgd_report.findings if f.rule == "GS601"]
    assert lr_finding.severity == "error" and "non-finite at step" in lr_finding.message
    assert "GS601" not in adam


def test_the_report_says_what_it_assumed() -> None:
    model = _mlp(3, nn.ReLU)
    x = _digits(1)[0][0]
    assumed = gradscope.analyze(model, (x,), device="cpu", batches=1)
    given = gradscope.analyze(model, (x,), device="cpu", batches=1, optimizer="sgd")
    assert ASSUMED_NOTE in assumed.notes
    assert ASSUMED_NOTE not in given.notes


def test_sgd_judges_a_vanishing_warning_by_the_step_it_makes() -> None:
    """Default-init ReLU x8 fails SGD at 0.1 (0.10-0.19), tanh x10 trains (0.66-0.68).

    Both have a warning-level vanishing gradient; with lr the measured first step of the
    ReLU stack's first layer is below the 1e-4 floor of the update band, the tanh's is not.
    """
    relu = _analyse(_mlp(8, nn.ReLU), optimizer="sgd", lr=0.1, steps=300)
    tanh = _analyse(_mlp(10, nn.Tanh), optimizer="sgd", lr=0.1, steps=300)
    [relu_finding] = [f for f in relu.findings if f.rule == "GS102"]
    [tanh_finding] = [f for f in tanh.findings if f.rule == "GS102"]
    assert relu_finding.severity == "error"
    assert relu_finding.evidence["entry_update_ratio"] < 1e-4  # type: ignore[operator]
    assert "300 planned steps" in relu_finding.message
    assert tanh_finding.severity == "warning"
    assert tanh_finding.evidence["entry_update_ratio"] >= 1e-4  # type: ignore[operator]
    # Without a learning rate there is no step to judge: the warning stays a warning.
    plain = _analyse(_mlp(8, nn.ReLU), optimizer="sgd")
    assert {f.rule: f.severity for f in plain.findings}.get("GS102") == "warning"
