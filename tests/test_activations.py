"""Tests for gradscope.estimate.activations.

Why these checks: the moments feed every forward and backward gain the estimator reports, so
they are pinned three independent ways: the published table (docs/static-estimate.md), exact
closed forms and limits, and sampling through torch's own functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradscope.estimate import activations as acts
from gradscope.estimate import quadrature
from gradscope.estimate.activations import (
    KNOWN_ACTIVATIONS,
    Moments,
    activation_defaults,
    activation_moments,
    activation_moments_array,
    canonical_activation,
    is_activation,
    params_from_call,
    params_from_module,
)

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


# --------------------------------------------------------------------------------------------
# The table in docs/static-estimate.md, q = 1: (name, params, E[phi'^2], E[phi^2])
# --------------------------------------------------------------------------------------------

TABLE: list[tuple[str, dict[str, float], float, float]] = [
    ("identity", {}, 1.0, 1.0),
    ("ReLU", {}, 0.5, 0.5),
    ("LeakyReLU", {}, (1 + 0.01**2) / 2, (1 + 0.01**2) / 2),
    ("LeakyReLU", {"negative_slope": 0.2}, (1 + 0.2**2) / 2, (1 + 0.2**2) / 2),
    ("ELU", {"alpha": 1.0}, 0.6681, 0.6449),
    ("GELU", {}, 0.4559, 0.4252),
    ("SiLU", {}, 0.3795, 0.3558),
    ("Mish", {}, 0.4791, 0.4523),
    ("tanh", {}, 0.4644, 0.3943),
    ("sigmoid", {}, 0.04484, 0.2934),
    ("softplus", {}, 0.2934, 0.9212),
    ("hardtanh", {}, 0.6827, 0.5161),
    ("hardswish", {}, 0.3585, 0.3316),
    ("SELU", {}, 1.0716, 1.0000),
]


@pytest.mark.parametrize(("name", "params", "grad_second", "second"), TABLE)
def test_table_at_q1(
    name: str, params: dict[str, float], grad_second: float, second: float
) -> None:
    m = activation_moments(name, 0.0, 1.0, **params)
    assert _rel(m.grad_second, grad_second) < 2e-3
    assert _rel(m.second, second) < 2e-3


# --------------------------------------------------------------------------------------------
# Exact values and limits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1e-12, 1e-4, 0.3, 1.0, 2.5, 1e3, 1e8])
def test_relu_is_exactly_half_and_q_over_two(q: float) -> None:
    m = activation_moments("relu", 0.0, q)
    assert m.grad_second == 0.5
    assert m.second == pytest.approx(q / 2, rel=1e-15)
    assert m.mean == pytest.approx(math.sqrt(q / (2 * math.pi)), rel=1e-15)


@pytest.mark.parametrize(
    ("mean", "var"),
    [(0.5, 1.0), (-0.5, 1.0), (2.0, 0.3), (-1.0, 4.0), (0.1, 1e-4), (3.0, 0.01), (-30.0, 1.0)],
)
def test_relu_shifted_mean(mean: float, var: float) -> None:
    # E[phi'^2] = P(z > 0); E[phi^2] = (m^2 + v) Phi(a) + m s phi(a), a = m / s.
    s = math.sqrt(var)
    a = mean / s
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    m = activation_moments("relu", mean, var)
    assert m.grad_second == pytest.approx(_cdf(a), rel=1e-14, abs=1e-300)
    assert m.second == pytest.approx((mean**2 + var) * _cdf(a) + mean * s * pdf, rel=1e-9, abs=0)
    # The same through torch's relu and the composite quadrature, which knows nothing of erf.
    # It integrates over +-10 sigma only, so deep-tail values are absolutely, not relatively, right.
    quad = quadrature.compute_moments(acts._bind("relu", ()), mean, var, force_composite=True)
    assert quad.grad_second == pytest.approx(m.grad_second, rel=1e-12, abs=1e-20)
    assert quad.second == pytest.approx(m.second, rel=1e-12, abs=1e-20)


def test_tanh_grad_second_tends_to_one_as_q_vanishes() -> None:
    # sech^4(z) = 1 - 2 z^2 + O(z^4), so E = 1 - 2q + O(q^2).
    values = [activation_moments("tanh", 0.0, q).grad_second for q in (1e-1, 1e-2, 1e-4, 1e-8)]
    assert values == sorted(values)
    for q, g in zip((1e-1, 1e-2, 1e-4, 1e-8), values, strict=True):
        assert abs(g - (1 - 2 * q)) <= 8 * q * q
    assert activation_moments("tanh", 0.0, 0.0).grad_second == 1.0


def test_sigmoid_grad_second_tends_to_one_sixteenth_as_q_vanishes() -> None:
    # sigmoid'(z)^2 = 1/16 - z^2/32 + O(z^4).
    for q in (1e-2, 1e-4, 1e-8):
        g = activation_moments("sigmoid", 0.0, q).grad_second
        assert abs(g - (1 / 16 - q / 32)) <= q * q
    assert activation_moments("sigmoid", 0.0, 0.0).grad_second == 1 / 16


@pytest.mark.parametrize("q", [1e-3, 0.1, 0.5, 1.0, 2.0, 10.0, 1e4, 1e8])
def test_hardtanh_is_erf(q: float) -> None:
    m = activation_moments("hardtanh", 0.0, q)
    assert m.grad_second == pytest.approx(math.erf(1 / math.sqrt(2 * q)), rel=1e-12)


def test_leaky_relu_closed_form() -> None:
    for a in (0.01, 0.2, -0.5, 2.0):
        for q in (0.1, 1.0, 7.0):
            m = activation_moments("leaky_relu", 0.0, q, negative_slope=a)
            assert m.grad_second == pytest.approx((1 + a * a) / 2, rel=1e-14)
            assert m.second == pytest.approx(q * (1 + a * a) / 2, rel=1e-14)


@pytest.mark.parametrize(
    ("name", "params", "tol"),
    [
        ("identity", {}, 1e-12),
        ("relu", {}, 1e-12),
        ("leaky_relu", {"negative_slope": 0.3}, 1e-12),
        ("prelu", {"negative_slope": -0.2}, 1e-12),
        ("hardtanh", {"min_val": -0.5, "max_val": 2.0}, 1e-12),
        ("relu6", {}, 1e-12),
        # torch's hardsigmoid backward uses the float32 constant 1/6 even in float64.
        ("hardsigmoid", {}, 1e-7),
    ],
)
@pytest.mark.parametrize(
    ("mean", "var"), [(0.0, 1.0), (0.7, 0.3), (-1.5, 4.0), (2.0, 1e6), (5.5, 0.01), (-7.0, 2.0)]
)
def test_closed_forms_match_torch_quadrature(
    name: str, params: dict[str, float], tol: float, mean: float, var: float
) -> None:
    act = acts._bind(name, acts._freeze_params(name, params))
    closed = quadrature.compute_moments(act, mean, var)
    quad = quadrature.compute_moments(act, mean, var, force_composite=True)
    for got, want in zip(
        (quad.mean, quad.second, quad.grad_second),
        (closed.mean, closed.second, closed.grad_second),
        strict=True,
    ):
        assert got == pytest.approx(want, rel=tol, abs=1e-14 * math.sqrt(1 + var + mean**2))


@pytest.mark.parametrize(
    "name", ["gelu", "silu", "mish", "tanh", "sigmoid", "logsigmoid", "tanhshrink"]
)
@pytest.mark.parametrize(("mean", "var"), [(0.0, 0.01), (0.4, 0.2), (-1.0, 0.24)])
def test_hermite_and_composite_rules_agree(name: str, mean: float, var: float) -> None:
    act = acts._bind(name, acts._FROZEN_DEFAULTS[name])
    hermite = quadrature.compute_moments(act, mean, var)
    composite = quadrature.compute_moments(act, mean, var, force_composite=True)
    assert hermite.second == pytest.approx(composite.second, rel=1e-12)
    assert hermite.grad_second == pytest.approx(composite.grad_second, rel=1e-12)
    assert hermite.mean == pytest.approx(composite.mean, rel=1e-12, abs=1e-15)


def test_wide_gaussian_asymptotics() -> None:
    # Far wider than the transition region, only the integral of phi'^2 over it matters:
    # int sech^4 = 4/3, int sigmoid'^2 = 1/6, int sech^2 = 2. This is where a fixed
    # Gauss-Hermite rule would step straight over the transition.
    v = 1e8
    norm = 1 / math.sqrt(2 * math.pi * v)
    tanh = activation_moments("tanh", 0.0, v)
    assert tanh.grad_second == pytest.approx(4 / 3 * norm, rel=1e-6)
    assert 1 - tanh.second == pytest.approx(2 * norm, rel=1e-6)
    assert activation_moments("sigmoid", 0.0, v).grad_second == pytest.approx(norm / 6, rel=1e-6)
    gelu = activation_moments("gelu", 0.0, v)
    assert gelu.grad_second == pytest.approx(0.5, rel=1e-4)
    assert gelu.second == pytest.approx(v / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Monte Carlo through torch's own functions
# --------------------------------------------------------------------------------------------

MC_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "hardswish": F.hardswish,
    "mish": F.mish,
}


@pytest.mark.parametrize("name", sorted(MC_FUNCTIONS))
@pytest.mark.parametrize("var", [0.3, 4.0])
def test_monte_carlo(name: str, var: float) -> None:
    mean, n = 0.7, 1_000_000
    rng = np.random.default_rng(20240601)
    # Stratified uniforms (one per 1/n slice) through the inverse normal CDF: still seeded
    # random sampling, with an error far below the 1% tolerance, so the test cannot flake.
    u = (np.arange(n) + rng.random(n)) / n
    z = mean + math.sqrt(var) * torch.special.ndtri(torch.from_numpy(u))
    x = z.clone().requires_grad_(True)
    y = MC_FUNCTIONS[name](x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    y = y.detach()
    sampled = (y.mean().item(), (y * y).mean().item(), (grad * grad).mean().item())
    m = activation_moments(name, mean, var)
    for got, want in zip((m.mean, m.second, m.grad_second), sampled, strict=True):
        assert _rel(got, want) < 1e-2


# --------------------------------------------------------------------------------------------
# Degenerate and extreme inputs
# --------------------------------------------------------------------------------------------


def test_zero_variance_evaluates_at_the_mean() -> None:
    t = math.tanh(0.3)
    m = activation_moments("tanh", 0.3, 0.0)
    assert m.mean == pytest.approx(t, rel=1e-15)
    assert m.second == pytest.approx(t * t, rel=1e-15)
    assert m.grad_second == pytest.approx((1 - t * t) ** 2, rel=1e-14)
    assert activation_moments("relu", -1.0, 0.0) == Moments(0.0, 0.0, 0.0)
    assert activation_moments("relu", 2.0, 0.0) == Moments(2.0, 4.0, 1.0)


def test_zero_variance_on_a_kink_takes_the_small_variance_limit() -> None:
    relu = activation_moments("relu", 0.0, 0.0)
    assert relu.grad_second == 0.5
    assert relu.grad_second == activation_moments("relu", 0.0, 1e-30).grad_second
    shrink = activation_moments("hardshrink", 0.5, 0.0)  # jump from 0 to 0.5 at lambd
    assert shrink.mean == pytest.approx(0.25)
    assert shrink.second == pytest.approx(0.125)
    assert shrink.grad_second == pytest.approx(0.5)
    near = activation_moments("hardshrink", 0.5, 1e-24)
    assert near.mean == pytest.approx(0.25, rel=1e-6)
    assert near.grad_second == pytest.approx(0.5, rel=1e-6)


MEANS = [0.0, 0.5, -3.0, 3.0, 6.0, 1e6, -1e6, 1e150, -math.inf, math.inf]
VARS = [0.0, 5e-324, 1e-300, 1e-30, 1e-6, 1.0, 1e6, 1e30, 1e200, 1e300, math.inf]


@pytest.mark.parametrize("name", sorted(KNOWN_ACTIVATIONS))
def test_extreme_inputs_stay_finite(name: str) -> None:
    for mean in MEANS:
        for var in VARS:
            m = activation_moments(name, mean, var)
            values = (m.mean, m.second, m.grad_second)
            assert all(math.isfinite(x) for x in values), (name, mean, var, m)
            assert m.second >= 0.0 and m.grad_second >= 0.0
            assert m.mean * m.mean <= m.second * (1 + 1e-9) + 1e-300, (name, mean, var, m)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        activation_moments("relu", math.nan, 1.0)
    with pytest.raises(ValueError):
        activation_moments("relu", 0.0, math.nan)
    with pytest.raises(ValueError):
        activation_moments("relu", 0.0, -1.0)
    # A rounding error below zero is read as zero variance.
    assert activation_moments("tanh", 0.2, -1e-18) == activation_moments("tanh", 0.2, 0.0)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

ALIASES = {
    # module classes
    "Identity": "identity",
    "ReLU": "relu",
    "ReLU6": "relu6",
    "LeakyReLU": "leaky_relu",
    "PReLU": "prelu",
    "ELU": "elu",
    "CELU": "celu",
    "SELU": "selu",
    "GELU": "gelu",
    "SiLU": "silu",
    "Mish": "mish",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Hardsigmoid": "hardsigmoid",
    "Hardswish": "hardswish",
    "Hardtanh": "hardtanh",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "LogSigmoid": "logsigmoid",
    "Tanhshrink": "tanhshrink",
    "Hardshrink": "hardshrink",
    "Softshrink": "softshrink",
    "nn.ReLU": "relu",
    "torch.nn.GELU": "gelu",
    "torch.nn.modules.activation.SiLU": "silu",
    "<class 'torch.nn.modules.activation.Tanh'>": "tanh",
    # functions
    "relu": "relu",
    "relu_": "relu",
    "relu6": "relu6",
    "gelu": "gelu",
    "silu": "silu",
    "mish": "mish",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "torch.sigmoid": "sigmoid",
    "torch.tanh": "tanh",
    "torch.relu": "relu",
    "torch.relu_": "relu",
    "Tensor.relu": "relu",
    "torch.special.expit": "sigmoid",
    "F.leaky_relu": "leaky_relu",
    "F.leaky_relu_": "leaky_relu",
    "torch.nn.functional.gelu": "gelu",
    "F.elu": "elu",
    "F.elu_": "elu",
    "F.celu": "celu",
    "F.selu": "selu",
    "F.hardtanh": "hardtanh",
    "F.hardtanh_": "hardtanh",
    "F.hardsigmoid": "hardsigmoid",
    "F.hardswish": "hardswish",
    "F.softplus": "softplus",
    "F.softsign": "softsign",
    "F.logsigmoid": "logsigmoid",
    "F.tanhshrink": "tanhshrink",
    "F.hardshrink": "hardshrink",
    "F.softshrink": "softshrink",
    "F.prelu": "prelu",
    "torch.prelu": "prelu",
    "swish": "silu",
    # aten ops
    "aten.relu.default": "relu",
    "aten.relu_.default": "relu",
    "aten.gelu.default": "gelu",
    "aten.silu.default": "silu",
    "aten.silu_.default": "silu",
    "aten.tanh.default": "tanh",
    "aten.sigmoid.default": "sigmoid",
    "aten.leaky_relu.default": "leaky_relu",
    "aten.hardtanh.default": "hardtanh",
    "aten.hardtanh_.default": "hardtanh",
    "aten.elu.default": "elu",
    "aten.celu.default": "celu",
    "aten.selu.default": "selu",
    "aten.relu6.default": "relu6",
    "aten.mish.default": "mish",
    "aten.hardswish.default": "hardswish",
    "aten.hardsigmoid.default": "hardsigmoid",
    "aten.softplus.default": "softplus",
    "aten.log_sigmoid.default": "logsigmoid",
    "aten.log_sigmoid_forward.default": "logsigmoid",
    "aten.hardshrink.default": "hardshrink",
    "aten.softshrink.default": "softshrink",
    "aten._prelu_kernel.default": "prelu",
    "aten.prelu.default": "prelu",
    "torch.ops.aten.gelu.default": "gelu",
    "aten::gelu": "gelu",
    "aten::leaky_relu": "leaky_relu",
}


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_aliases(alias: str, canonical: str) -> None:
    assert canonical_activation(alias) == canonical
    assert is_activation(alias)


def test_every_canonical_name_is_its_own_alias() -> None:
    for name in KNOWN_ACTIVATIONS:
        assert canonical_activation(name) == name
    assert len(KNOWN_ACTIVATIONS) == 22


def test_module_class_aliases_are_real_torch_classes() -> None:
    for alias in ALIASES:
        if alias[0].isupper() and "." not in alias:
            assert isinstance(getattr(nn, alias), type), alias


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "Linear",
        "F.linear",
        "aten.add.Tensor",
        "aten.gelu_backward.default",
        "softmax",
        "Softmax",
        "GLU",
        "conv2d",
        "dropout",
        "threshold",
        "",
        "aten",
        "model.encoder",
    ],
)
def test_unknown_names(name: str) -> None:
    # Documented behaviour: canonical_activation gives None, activation_moments raises.
    assert canonical_activation(name) is None
    assert not is_activation(name)
    with pytest.raises(ValueError):
        activation_moments(name)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def test_defaults_share_the_cache_entry_and_aliases_agree() -> None:
    assert activation_moments("leaky_relu", 0.1, 0.9) is activation_moments(
        "F.leaky_relu", 0.1, 0.9, negative_slope=0.01
    )
    assert activation_moments("elu", 0.1, 0.9) is activation_moments("ELU", 0.1, 0.9, alpha=1.0)
    assert activation_moments("gelu", 0.3, 1.0) is activation_moments("gelu", 0.3 + 1e-16, 1.0)
    assert activation_defaults("Softplus") == {"beta": 1.0, "threshold": 20.0}


def test_gelu_approximate() -> None:
    exact = activation_moments("gelu", 0.2, 1.5)
    tanh_form = activation_moments("gelu", 0.2, 1.5, approximate="tanh")
    assert tanh_form != exact
    assert tanh_form.second == pytest.approx(exact.second, rel=1e-3)
    assert activation_moments("gelu", 0.2, 1.5, approximate="none") is exact
    with pytest.raises(ValueError):
        activation_moments("gelu", approximate="erf")


def test_parameter_plumbing() -> None:
    leaky = activation_moments("leaky_relu", 0.3, 2.0, negative_slope=0.1)
    assert activation_moments("prelu", 0.3, 2.0, negative_slope=0.1) == leaky
    assert activation_moments("prelu", 0.3, 2.0, weight=0.1) == leaky
    assert activation_moments("relu", 0.3, 2.0, inplace=True) == activation_moments(
        "relu", 0.3, 2.0
    )
    selu = activation_moments("selu", 0.3, 2.0)
    via_elu = activation_moments("elu", 0.3, 2.0, alpha=SELU_ALPHA, scale=SELU_SCALE)
    assert via_elu.second == pytest.approx(selu.second, rel=1e-12)
    assert via_elu.grad_second == pytest.approx(selu.grad_second, rel=1e-12)
    celu = activation_moments("celu", 0.3, 2.0, alpha=1.0)
    assert celu.second == pytest.approx(activation_moments("elu", 0.3, 2.0).second, rel=1e-14)
    # softplus_beta(x) = softplus(beta x) / beta, threshold included.
    beta, mean, var = 2.5, 0.4, 1.7
    scaled = activation_moments("softplus", mean, var, beta=beta)
    plain = activation_moments("softplus", beta * mean, beta * beta * var)
    assert scaled.mean == pytest.approx(plain.mean / beta, rel=1e-12)
    assert scaled.second == pytest.approx(plain.second / beta**2, rel=1e-12)
    assert scaled.grad_second == pytest.approx(plain.grad_second, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("relu", {"negative_slope": 0.1}),
        ("leaky_relu", {"alpha": 0.1}),
        ("leaky_relu", {"negative_slope": "0.1"}),
        ("hardtanh", {"min_val": 1.0, "max_val": -1.0}),
        ("softshrink", {"lambd": -0.1}),
        ("celu", {"alpha": 0.0}),
        ("softplus", {"beta": 0.0}),
        ("elu", {"alpha": math.inf}),
    ],
)
def test_bad_parameters(name: str, params: dict[str, float | str]) -> None:
    with pytest.raises(ValueError):
        activation_moments(name, 0.0, 1.0, **params)


def test_params_from_module() -> None:
    assert params_from_module(nn.LeakyReLU(0.2)) == {"negative_slope": 0.2}
    assert params_from_module(nn.ELU(alpha=0.5)) == {"alpha": 0.5}
    assert params_from_module(nn.ReLU6()) == {}
    assert params_from_module(nn.Hardtanh(-2.0, 2.0)) == {"min_val": -2.0, "max_val": 2.0}
    assert params_from_module(nn.GELU(approximate="tanh")) == {"approximate": "tanh"}
    assert params_from_module(nn.Softplus(beta=2.0, threshold=10.0)) == {
        "beta": 2.0,
        "threshold": 10.0,
    }
    prelu = nn.PReLU(num_parameters=3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
    slope = params_from_module(prelu)["negative_slope"]
    assert slope == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09) / 3), rel=1e-6)
    with pytest.raises(ValueError):
        params_from_module(nn.Linear(2, 2))
    modules = [
        nn.Identity(),
        nn.ReLU(),
        nn.ReLU6(),
        nn.LeakyReLU(),
        nn.PReLU(),
        nn.ELU(),
        nn.CELU(0.7),
        nn.SELU(),
        nn.GELU(),
        nn.SiLU(),
        nn.Mish(),
        nn.Tanh(),
        nn.Sigmoid(),
        nn.Hardsigmoid(),
        nn.Hardswish(),
        nn.Hardtanh(),
        nn.Softplus(),
        nn.Softsign(),
        nn.LogSigmoid(),
        nn.Tanhshrink(),
        nn.Hardshrink(0.3),
        nn.Softshrink(),
    ]
    assert {canonical_activation(type(m).__name__) for m in modules} == KNOWN_ACTIVATIONS
    for module in modules:
        m = activation_moments(type(module).__name__, 0.1, 0.8, **params_from_module(module))
        assert math.isfinite(m.second)


def test_params_from_traced_calls() -> None:
    # What the tracer will see: aten ops with positional scalars (F.selu becomes aten.elu
    # with SELU's constants, F.relu6 becomes aten.hardtanh(0, 6)).
    from torch.fx.experimental.proxy_tensor import make_fx

    weight = torch.tensor([0.1], dtype=torch.float64)
    cases: list[tuple[Callable[[torch.Tensor], torch.Tensor], str, dict[str, float | str]]] = [
        (lambda t: F.selu(t), "selu", {}),
        (lambda t: F.relu6(t), "relu6", {}),
        (lambda t: F.leaky_relu(t, 0.2), "leaky_relu", {"negative_slope": 0.2}),
        (lambda t: F.gelu(t, approximate="tanh"), "gelu", {"approximate": "tanh"}),
        (lambda t: F.celu(t, 0.5), "celu", {"alpha": 0.5}),
        (lambda t: F.softplus(t, 2.0, 5.0), "softplus", {"beta": 2.0, "threshold": 5.0}),
        (lambda t: F.prelu(t, weight), "prelu", {"negative_slope": 0.1}),
    ]
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)
    for fn, name, params in cases:
        graph = make_fx(fn)(x).graph
        node = next(
            n for n in graph.nodes if n.op == "call_function" and is_activation(str(n.target))
        )
        target = str(node.target)
        args = [a for a in node.args[1:] if not isinstance(a, torch.fx.Node)]
        if target.startswith("aten._prelu_kernel"):
            args = [weight]
        got = activation_moments(target, 0.3, 1.2, **params_from_call(target, args, node.kwargs))
        want = activation_moments(name, 0.3, 1.2, **params)
        assert got.second == pytest.approx(want.second, rel=1e-12), target
        assert got.grad_second == pytest.approx(want.grad_second, rel=1e-12), target
    assert params_from_call("F.leaky_relu", (0.2, True)) == {"negative_slope": 0.2}
    assert params_from_call("aten.gelu.default", (), {"approximate": "tanh"}) == {
        "approximate": "tanh"
    }


# --------------------------------------------------------------------------------------------
# Torch fidelity, batching and grad modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KNOWN_ACTIVATIONS))
def test_derivative_is_torch_autograd(name: str) -> None:
    act = acts._bind(name, acts._FROZEN_DEFAULTS[name])
    z = np.linspace(-7.3, 7.1, 301)
    phi, grad = quadrature.phi_and_grad(act, z)
    x = torch.from_numpy(z.copy()).requires_grad_(True)
    y = act.fn(x)
    (want,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert np.array_equal(grad, want.numpy())
    assert np.array_equal(phi, y.detach().numpy())


@pytest.mark.parametrize("name", ["gelu", "relu", "hardswish", "softsign", "tanh", "elu"])
def test_array_matches_scalar(name: str) -> None:
    rng = np.random.default_rng(7)
    means = np.concatenate([rng.normal(0, 2, 40), [0.0, 0.0, 3.0, -3.0]])
    variances = np.concatenate([10 ** rng.uniform(-6, 6, 40), [0.0, 1.0, 0.0, 1e-300]])
    e1, e2, g2 = activation_moments_array(name, means, variances)
    act = acts._bind(name, acts._FROZEN_DEFAULTS[name])
    for i in range(means.shape[0]):
        # Against the unrounded scalar computation: the public function rounds (mean, var) to
        # 12 digits for its cache key, which moves deep-tail values by up to ~1e-9.
        m = quadrature.compute_moments(act, *acts._clean(float(means[i]), float(variances[i])))
        scale = 1 + abs(float(means[i])) + math.sqrt(float(variances[i]))
        assert e1[i] == pytest.approx(m.mean, rel=1e-9, abs=1e-12 * scale)
        assert e2[i] == pytest.approx(m.second, rel=1e-9)
        assert g2[i] == pytest.approx(m.grad_second, rel=1e-9, abs=1e-300)
        public = activation_moments(name, float(means[i]), float(variances[i]))
        assert g2[i] == pytest.approx(public.grad_second, rel=1e-6, abs=1e-300)
    e1, e2, g2 = activation_moments_array("tanh", np.zeros((2, 3)), 1.0)
    assert e1.shape == e2.shape == g2.shape == (2, 3)


def test_works_under_no_grad_and_inference_mode() -> None:
    gelu = acts._bind("gelu", acts._FROZEN_DEFAULTS["gelu"])
    expected = quadrature.compute_moments(gelu, 0.123, 2.34)
    with torch.no_grad():
        assert quadrature.compute_moments(gelu, 0.123, 2.34) == expected
    with torch.inference_mode():
        assert activation_moments("gelu", 0.123, 2.34) == expected
        e1, _, _ = activation_moments_array("silu", [0.1, 0.2], 3.0)
        assert np.isfinite(e1).all()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "sigmoid"])
def test_unit_mean_spread_is_the_quadrature_over_unit_means(name: str) -> None:
    """The cached spread of unit means equals Var_c g(m_c) computed from the array moments,
    and a Monte Carlo of units whose means are drawn N(mean, spread)."""
    mean, spread, within = 0.3, 0.8, 0.5
    u, w = np.polynomial.hermite_e.hermegauss(24)
    w = w / math.sqrt(2 * math.pi)
    g = acts.activation_moments_array(name, mean + math.sqrt(spread) * u, within)[0]
    direct = float(w @ (g * g)) - float(w @ g) ** 2
    assert acts.unit_mean_spread(name, mean, spread, within) == pytest.approx(direct, rel=1e-9)
    gen = torch.Generator().manual_seed(0)
    m_c = mean + math.sqrt(spread) * torch.randn(4000, 1, generator=gen, dtype=torch.float64)
    x = m_c + math.sqrt(within) * torch.randn(4000, 2000, generator=gen, dtype=torch.float64)
    phi = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid}
    unit_means = phi[name](x).mean(dim=1)
    assert acts.unit_mean_spread(name, mean, spread, within) == pytest.approx(
        float(unit_means.var()), rel=0.08)
