"""The probe against an independent brute-force computation, for every runner.

Like Cockpit's tests: the quantities the probe reports are recomputed here in
plain eager PyTorch, with forward hooks and ``retain_grad`` on the outputs of
interest, ``loss.backward()``, loops over ``named_parameters()`` and real
``torch.optim`` steps. Nothing from gradscope is used to compute the
expected values. Each model is analysed with each tracer forced
(``symbolic_trace``, ``export``, ``runtime``), so the three runners are checked
against the same numbers.

The probe's loss is ``sum(output * r)`` with ``r = randn(output.shape)`` from a
CPU generator seeded with ``seed + 1`` (gradscope/probe.py). The brute force
rebuilds the same ``r``; one test also uses a scalar-output model, for which
the reported ratios do not depend on ``r`` at all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope

TRACERS = ("symbolic_trace", "export", "runtime")
SEED = 0
RTOL = 1e-4

WEIGHT_TYPES = (nn.Linear, nn.Conv2d)
OBSERVED_TYPES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh)
#: Report ops that stand for a weight layer's or a ReLU's output, per tracer vocabulary.
LAYER_OPS = {"Linear": "linear", "linear": "linear", "Conv2d": "conv", "conv2d": "conv",
             "ReLU": "relu", "relu": "relu", "Tanh": "tanh", "tanh": "tanh"}


# ---------------------------------------------------------------------------
# Models (seeded; some units are killed on purpose so dead_fraction is not 0)


class MLP(nn.Module):
    """Linear/ReLU/Tanh stack with an in-place ReLU, dead and saturated hidden units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(12, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.act2 = nn.Tanh()
        self.fc3 = nn.Linear(32, 32)
        self.act3 = nn.ReLU(inplace=True)
        self.fc4 = nn.Linear(32, 5)
        with torch.no_grad():
            self.fc1.bias[:3] = -100.0  # units 0-2 of act1 never fire
            self.fc2.bias[:4] = 4.0  # units 0-3 of act2 mostly in tanh's flat tail
            self.fc3.bias[:5] = -100.0  # units 0-4 of act3 never fire

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(x))
        h = self.act2(self.fc2(h))
        h = self.act3(self.fc3(h))
        return self.fc4(h)


class InplaceMLP(nn.Module):
    """Every activation in place, right after the layer whose output it overwrites."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(
            nn.Linear(10, 24), nn.ReLU(inplace=True),
            nn.Linear(24, 24), nn.ReLU(inplace=True),
            nn.Linear(24, 24), nn.ReLU(inplace=True),
            nn.Linear(24, 3),
        )
        with torch.no_grad():
            self.net[2].bias[:4] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Conv/ReLU (one in place, one channel dead), pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv2.bias[0] = -100.0  # channel 0 of relu2 never fires

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


class Summed(nn.Module):
    """A scalar output: dLoss/d(node) / dLoss/d(output) is then the same for every direction."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).sum()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mlp": (MLP, lambda: _randn(8, 12, seed=10)),
    "inplace_mlp": (InplaceMLP, lambda: _randn(8, 10, seed=11)),
    "cnn": (CNN, lambda: _randn(4, 3, 8, 8, seed=12)),
}


# ---------------------------------------------------------------------------
# Brute force


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().norm())


def _direction(out: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    return torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.dtype)


def brute_force(model: nn.Module, x: torch.Tensor, *, seed: int = SEED,
                use_direction: bool = True, optimizer: str | None = None,
                lr: float = 0.0, weight_decay: float = 0.0) -> dict[str, Any]:
    """Measure a deep copy of ``model`` eagerly; the original is left alone.

    Each observed module's output is kept with ``retain_grad`` and a clone is
    handed on, so an in-place activation downstream cannot overwrite the tensor
    whose gradient is read (the clone has the same gradient).
    """
    model = copy.deepcopy(model)
    model.train()
    outputs: dict[str, torch.Tensor] = {}
    dead: dict[str, float] = {}
    saturated: dict[str, float] = {}

    def hook(name: str) -> Callable[..., torch.Tensor]:
        def fn(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            if isinstance(module, nn.ReLU):
                active = (out.detach() > 0).any(dim=0)
                dead[name] = 1.0 - active.double().mean().item()
            if isinstance(module, nn.Tanh):
                # "flat": tanh'(z) = 1 - tanh(z)^2 below 1% of its maximum
                saturated[name] = (1 - out.detach().double() ** 2 < 0.01).double().mean().item()
            out.retain_grad()
            outputs[name] = out
            return out.clone()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, OBSERVED_TYPES)]
    try:
        torch.manual_seed(seed)
        xin = x.detach().clone().requires_grad_(True)
        out = model(xin)
    finally:
        for h in handles:
            h.remove()
    r = _direction(out, seed) if use_direction else torch.ones_like(out)
    loss = (out * r).sum()
    loss.backward()
    out_rms = _rms(r)
    grad_rms = {n: _rms(t.grad) / out_rms for n, t in outputs.items()}
    grad_rms["<input>"] = _rms(xin.grad) / out_rms
    ratio: dict[str, float] = {}
    before: dict[str, torch.Tensor] = {}
    for pname, p in model.named_parameters():
        if pname.endswith(".weight"):
            owner = pname.rsplit(".", 1)[0]
            ratio[owner] = _norm(p.grad) / _norm(p)
            before[owner] = p.detach().clone()
    update: dict[str, float] = {}
    if optimizer is not None:
        params = list(model.parameters())
        opt: torch.optim.Optimizer
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        opt.step()
        for pname, p in model.named_parameters():
            owner = pname.rsplit(".", 1)[0]
            if pname.endswith(".weight"):
                delta = p.detach().double() - before[owner].double()
                update[owner] = float(delta.norm()) / _norm(before[owner])
    return {"grad_rms": grad_rms, "param_grad_ratio": ratio, "dead": dead,
            "saturated": saturated,
            "update_ratio": update, "weights": {n: p.grad for n, p in model.named_parameters()}}


def _by_module(report: gradscope.Report) -> dict[str, Any]:
    """Report layers for weight layers and ReLUs, keyed by module path (one per module)."""
    found: dict[str, Any] = {}
    for layer in report.layers:
        if layer.module is None or layer.op not in LAYER_OPS:
            continue
        assert layer.module not in found, f"two {layer.op} nodes for module {layer.module}"
        found[layer.module] = layer
    return found


def _modules_of(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, types)]


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[nn.Module, torch.Tensor, dict[str, Any]]]:
    built = {}
    for name, (make, inputs) in CASES.items():
        model, x = make(), inputs()
        built[name] = (model, x, brute_force(model, x))
    return built


# ---------------------------------------------------------------------------
# Gradient RMS, weight-gradient ratio, dead fraction


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("case", list(CASES))
def test_probe_matches_brute_force(cases: dict[str, Any], case: str, tracer: str) -> None:
    model, x, expected = cases[case]
    report = gradscope.analyze(model, x, device="cpu", tracer=tracer, seed=SEED, batches=1)
    assert report.model.trace.method == tracer
    layers = _by_module(report)
    observed = _modules_of(model, OBSERVED_TYPES)
    assert set(observed) <= set(layers), f"{tracer} lost modules: {set(observed) - set(layers)}"

    for name in observed:
        got = layers[name].probe_grad_rms
        assert got is not None, f"{tracer}: no probe_grad_rms for {name}"
        assert got == pytest.approx(expected["grad_rms"][name], rel=RTOL), (tracer, name)
    # The model output's own gradient is the reference, so it is exactly 1.
    last = _modules_of(model, WEIGHT_TYPES)[-1]
    assert layers[last].probe_grad_rms == pytest.approx(1.0, rel=1e-9)
    inputs = [layer for layer in report.layers if layer.op == "input"]
    assert inputs[0].probe_grad_rms == pytest.approx(expected["grad_rms"]["<input>"], rel=RTOL)

    for name in _modules_of(model, WEIGHT_TYPES):
        got = layers[name].param_grad_ratio
        assert got is not None, (tracer, name)
        assert got == pytest.approx(expected["param_grad_ratio"][name], rel=RTOL), (tracer, name)
        assert layers[name].dead_fraction is None

    relus = _modules_of(model, (nn.ReLU,))
    for name in relus:
        assert layers[name].dead_fraction == pytest.approx(expected["dead"][name], abs=1e-6)
        assert layers[name].param_grad_ratio is None
    # The killed units are really seen as dead (the check is not vacuous).
    assert any(expected["dead"][name] > 0 for name in relus)

    for name in _modules_of(model, (nn.Tanh,)):
        # A float32 tanh output may sit on either side of the 1% line; allow one element.
        n_out = math.prod(layers[name].shape)
        assert expected["saturated"][name] > 0
        assert layers[name].saturated_fraction == pytest.approx(
            expected["saturated"][name], abs=1.01 / n_out), (tracer, name)
        assert layers[name].dead_fraction is None


@pytest.mark.parametrize("tracer", TRACERS)
def test_ratios_do_not_depend_on_the_direction(tracer: str) -> None:
    """Scalar output: the brute force uses loss = output, no random direction at all."""
    model = Summed(MLP())
    x = _randn(8, 12, seed=10)
    expected = brute_force(model, x, use_direction=False)
    for seed in (0, 7):
        report = gradscope.analyze(model, x, device="cpu", tracer=tracer, seed=seed, batches=1)
        layers = _by_module(report)
        for name in _modules_of(model, OBSERVED_TYPES):
            assert layers[name].probe_grad_rms == pytest.approx(
                expected["grad_rms"][name], rel=RTOL), (tracer, seed, name)
        # ||grad W|| / ||W|| is absolute, so it scales with |r|, which the probe reports
        # as the output gradient's RMS (r is one number here).
        scale = report.probe.output_grad_rms
        assert scale is not None and scale > 0
        for name in _modules_of(model, WEIGHT_TYPES):
            assert layers[name].param_grad_ratio / scale == pytest.approx(
                expected["param_grad_ratio"][name], rel=RTOL), (tracer, seed, name)


def test_in_place_relu_gradients_are_those_of_distinct_values() -> None:
    """In-place ReLU overwrites the Linear's output: its pre- and post-ReLU gradients differ.

    A probe that read both from the same (overwritten) tensor would report the
    same number twice; the brute force shows they differ by the dead units'
    share, so equal values would be a measurement error.
    """
    model, x = InplaceMLP(), _randn(8, 10, seed=11)
    expected = brute_force(model, x)["grad_rms"]
    assert expected["net.2"] != pytest.approx(expected["net.3"], rel=1e-3)
    for tracer in TRACERS:
        layers = _by_module(gradscope.analyze(model, x, device="cpu", tracer=tracer, batches=1))
        assert layers["net.2"].probe_grad_rms == pytest.approx(expected["net.2"], rel=RTOL)
        assert layers["net.3"].probe_grad_rms == pytest.approx(expected["net.3"], rel=RTOL)


# ---------------------------------------------------------------------------
# First-update / weight ratios against real optimiser steps


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize(("optimizer", "lr", "weight_decay"),
                         [("sgd", 0.5, 0.0), ("adam", 1e-2, 0.0), ("adamw", 1e-2, 0.1),
                          ("sgd", 0.5, 0.01)])
def test_update_ratio_matches_a_real_optimizer_step(tracer: str, optimizer: str, lr: float,
                                                    weight_decay: float) -> None:
    model, x = MLP(), _randn(8, 12, seed=10)
    expected = brute_force(model, x, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    report = gradscope.analyze(model, x, device="cpu", tracer=tracer, lr=lr, batches=1,
                               optimizer=optimizer, weight_decay=weight_decay)
    assert report.probe.lr == lr and report.probe.optimizer == optimizer
    layers = _by_module(report)
    for name in _modules_of(model, WEIGHT_TYPES):
        got = layers[name].update_ratio
        assert got is not None, (tracer, name)
        # ||W1 - W0|| from float32 weights: 1e-4 leaves room for the subtraction.
        assert got == pytest.approx(expected["update_ratio"][name], rel=RTOL), (tracer, name)


def test_update_ratio_closed_forms() -> None:
    """SGD: lr |g| / |W|; Adam's first step: lr g / (|g| + eps) per element."""
    model, x = MLP(), _randn(8, 12, seed=10)
    expected = brute_force(model, x)
    grads = expected["weights"]
    lr = 3e-3
    sgd = _by_module(gradscope.analyze(model, x, device="cpu", lr=lr, optimizer="sgd", batches=1))
    adam = _by_module(gradscope.analyze(model, x, device="cpu", lr=lr, optimizer="adam", batches=1))
    for name in _modules_of(model, WEIGHT_TYPES):
        w = model.get_submodule(name).weight.detach().double()
        g = grads[f"{name}.weight"].double()
        assert sgd[name].update_ratio == pytest.approx(float(lr * g.norm() / w.norm()), rel=RTOL)
        step = lr * g / (g.abs() + 1e-8)
        assert adam[name].update_ratio == pytest.approx(float(step.norm() / w.norm()), rel=RTOL)
    # Without lr there is no update ratio.
    plain = _by_module(gradscope.analyze(model, x, device="cpu", batches=1))
    assert all(layer.update_ratio is None for layer in plain.values())


# ---------------------------------------------------------------------------
# Non-finite values


class NaNForward(nn.Module):
    """fc1 -> sqrt (NaN on negatives) -> fc2 -> ReLU -> fc3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sqrt(self.fc1(x))
        return self.fc3(self.relu(self.fc2(h)))

    def eager(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The same computation step by step, for the brute force."""
        h1 = self.fc1(x)
        h2 = torch.sqrt(h1)
        h3 = self.fc2(h2)
        h4 = self.relu(h3)
        return [("linear", h1), ("sqrt", h2), ("linear", h3), ("relu", h4),
                ("linear", self.fc3(h4))]


class NaNBackward(nn.Module):
    """fc1 -> ReLU -> sqrt -> fc2: finite forward, infinite gradient at sqrt(0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = nn.Linear(6, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sqrt(self.relu(self.fc1(x))))

    def eager(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        h1 = self.fc1(x)
        h2 = self.relu(h1)
        h3 = torch.sqrt(h2)
        return [("linear", h1), ("relu", h2), ("sqrt", h3), ("linear", self.fc2(h3))]


def _eager_flags(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[bool], list[bool]]:
    model = copy.deepcopy(model)
    steps = model.eager(x.clone().requires_grad_(True))  # type: ignore[operator]
    for _, t in steps:
        t.retain_grad()
    out = steps[-1][1]
    (out * _direction(out, SEED)).sum().backward()
    ops = [op for op, _ in steps]
    fwd = [not bool(torch.isfinite(t).all()) for _, t in steps]
    bwd = [not bool(torch.isfinite(t.grad).all()) for _, t in steps]
    return ops, fwd, bwd


def _op_chain(report: gradscope.Report) -> list[Any]:
    """The compute layers of a chain model, with modules and functions in one vocabulary."""
    chain = []
    for layer in report.layers:
        if layer.op == "input":
            continue
        chain.append(layer)
    return chain


def _norm_op(op: str) -> str:
    return {"Linear": "linear", "ReLU": "relu"}.get(op, op)


@pytest.mark.parametrize("tracer", TRACERS)
def test_nonfinite_forward_located(tracer: str) -> None:
    model, x = NaNForward(), _randn(8, 6, seed=13)
    ops, fwd, _ = _eager_flags(model, x)
    assert fwd == [False, True, True, True, True]  # the brute force itself: NaN from sqrt on
    report = gradscope.analyze(model, x, device="cpu", tracer=tracer, batches=1)
    chain = _op_chain(report)
    assert [_norm_op(layer.op) for layer in chain] == ops
    assert [layer.nonfinite_forward for layer in chain] == fwd
    rules = {f.rule: f for f in report.findings}
    assert "GS501" in rules and report.status == "unhealthy"
    assert rules["GS501"].location.node == chain[fwd.index(True)].name
    assert report.probe.nonfinite_forward == chain[fwd.index(True)].name
    # NaN makes every gradient figure meaningless: no vanishing/exploding verdict on it.
    assert not {"GS102", "GS202", "GS502"} & set(rules)
    import json
    json.dumps(report.to_dict(), allow_nan=False)  # NaN never reaches the JSON


@pytest.mark.parametrize("tracer", TRACERS)
def test_nonfinite_backward_located(tracer: str) -> None:
    model, x = NaNBackward(), _randn(8, 6, seed=14)
    ops, fwd, bwd = _eager_flags(model, x)
    assert not any(fwd)
    assert bwd == [False, True, False, False]  # inf only at the ReLU output (sqrt'(0))
    report = gradscope.analyze(model, x, device="cpu", tracer=tracer, batches=1)
    chain = _op_chain(report)
    assert [_norm_op(layer.op) for layer in chain] == ops
    assert [layer.nonfinite_forward for layer in chain] == fwd
    assert [layer.nonfinite_backward for layer in chain] == bwd
    rules = {f.rule: f for f in report.findings}
    assert "GS502" in rules and "GS501" not in rules
    # The finding points at the op whose backward made the inf (sqrt), not at its input.
    assert rules["GS502"].location.node == chain[2].name
    assert rules["GS502"].evidence["first_node"] == chain[1].name
    assert all(math.isfinite(layer.probe_grad_rms) for layer in chain
               if layer.probe_grad_rms is not None and not layer.nonfinite_backward)


class FunctionalWeight(nn.Module):
    """A bare nn.Parameter used through ``@``: its node is a matmul, not a module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.w = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x @ self.w))


@pytest.mark.parametrize("tracer", TRACERS)
def test_functional_parameter_ratio(tracer: str) -> None:
    model, x = FunctionalWeight(), _randn(5, 8, seed=15)
    ref = copy.deepcopy(model)
    out = ref(x)
    (out * _direction(out, SEED)).sum().backward()
    expected = _norm(ref.w.grad) / _norm(ref.w)
    report = gradscope.analyze(model, x, device="cpu", tracer=tracer, batches=1)
    matmul = [layer for layer in report.layers if layer.op == "matmul"]
    assert len(matmul) == 1
    assert matmul[0].param_grad_ratio == pytest.approx(expected, rel=RTOL)
