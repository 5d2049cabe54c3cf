"""Each op rule of the static estimator against a brute-force autograd measurement.

For every op family the estimator models (gradscope/estimate/ops_*.py), a
tiny model ``body(inputs) -> y -> readout`` is analysed statically and then
measured eagerly, independently of gradscope's probe:

- the op's squared-norm backward gain ``G = E||dL/d input||^2 / E||dL/d y||^2``.
  Static: ``static_grad_rms(input)^2 * numel(input) / (static_grad_rms(y)^2 *
  numel(y))`` from ``gradscope.analyze(..., probe=False)``'s layers (the
  estimator's ``sq_norm`` directly for eval-mode models, because ``analyze``
  always puts the model in train mode). Measured: the inputs get
  ``requires_grad``, ``y`` is caught by a pre-hook on the readout and kept with
  ``retain_grad``, the loss is ``sum(output * r)`` for Gaussian directions
  ``r``, and squared gradient norms are summed over a few seeds.
- the forward second moment of ``y``, where the estimator's rule sets it
  (``estimate(trace_model(...)).moments[y] = (mean, second)``), against
  ``mean(y**2)``.

The readout is a square linear map with an orthogonal weight over ``y``'s last
dimension, so the gradient reaching ``y`` is an isotropic Gaussian, as the
mean-field rules assume, and the readout's own gain cancels in ``G``.

Tolerance: ``|log10(estimate / measured)| <= 0.3`` on the squared quantity.
Where the rule is off by more, the case is ``xfail(strict=True)`` with the
numbers and the reason in its mark; fix the rule, then drop the mark.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.estimate.engine import estimate
from gradscope.tracing import trace_model

TOL = 0.3
TRACER = "symbolic_trace"
SEEDS = 3


# ---------------------------------------------------------------------------
# Models


class Fn(nn.Module):
    """A function of the inputs as a module, so symbolic tracing records its torch calls."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(*xs)


def _readout(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        nn.init.orthogonal_(layer.weight, generator=torch.Generator().manual_seed(1234))
    return layer


class One(nn.Module):
    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body = body
        self.readout = _readout(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.body(x))


class Two(One):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.readout(self.body(a, b))


class Three(One):
    def forward(self, q: torch.Tensor, k: torch.Tensor,  # type: ignore[override]
                v: torch.Tensor) -> torch.Tensor:
        return self.readout(self.body(q, k, v))


HARNESS = {1: One, 2: Two, 3: Three}


class Residual(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def _split_swap(x: torch.Tensor) -> torch.Tensor:
    a, b = x.split([3, 5], dim=1)
    return torch.cat([b, a], dim=1)


def _split_first(x: torch.Tensor) -> torch.Tensor:
    a, _ = x.split([3, 5], dim=1)
    return a


def _rms_norm_by_hand(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


# ---------------------------------------------------------------------------
# Cases


def _g(*shape: int, seed: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * std + mean


@dataclass(frozen=True)
class Case:
    id: str
    body: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    #: Inputs whose backward gain is checked ("x" for single-input models).
    srcs: tuple[str, ...] = ("x",)
    #: Whether the forward second moment of y is checked.
    forward: bool = True
    eval_mode: bool = False
    #: Per-check xfail reasons: "fwd" or a source name -> reason.
    xfail: dict[str, str] = field(default_factory=dict)


def _init(layer: nn.Module, how: str) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    w = layer.weight  # type: ignore[union-attr]
    b = getattr(layer, "bias", None)
    with torch.no_grad():
        if how == "kaiming_in":
            nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
        elif how == "kaiming_out":
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=gen)
        elif how == "xavier":
            nn.init.xavier_normal_(w, generator=gen)
        elif how == "normal05":  # N(0, 0.5): standard deviation 0.5, weights and bias
            nn.init.normal_(w, 0.0, 0.5, generator=gen)
            if isinstance(b, torch.Tensor):
                nn.init.normal_(b, 0.0, 0.5, generator=gen)
    return layer


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()
    return build


CASES: list[Case] = []


def add(case_id: str, make: Callable[[], nn.Module],
        inputs: Callable[[], tuple[torch.Tensor, ...]], **kw: Any) -> None:
    CASES.append(Case(case_id, _seeded(make), inputs, **kw))


# Linear: PyTorch default, Kaiming (fan_in, fan_out), Xavier, N(0, 0.5); with and without bias
for _how in ("default", "kaiming_in", "kaiming_out", "xavier", "normal05"):
    for _bias in (True, False):
        add(f"linear-{_how}-{'bias' if _bias else 'nobias'}",
            lambda how=_how, bias=_bias: _init(nn.Linear(128, 256, bias=bias), how),
            lambda: (_g(256, 128, seed=1),))

# Convolutions: stride 1 and 2, groups, 1d/2d/3d, transposed
for _cid, _make, _shape in (
    ("conv1d", lambda: nn.Conv1d(8, 16, 3, padding=1), (32, 8, 64)),
    ("conv1d-stride2", lambda: nn.Conv1d(8, 16, 3, stride=2, padding=1), (32, 8, 64)),
    ("conv1d-groups4", lambda: nn.Conv1d(8, 16, 3, padding=1, groups=4), (32, 8, 64)),
    ("conv2d", lambda: nn.Conv2d(8, 16, 3, padding=1), (8, 8, 16, 16)),
    ("conv2d-stride2", lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (8, 8, 16, 16)),
    ("conv2d-groups4", lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (8, 8, 16, 16)),
    ("conv2d-depthwise", lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 8, 16, 16)),
    ("conv2d-kaiming", lambda: _init(nn.Conv2d(8, 16, 3, padding=1), "kaiming_in"),
     (8, 8, 16, 16)),
    ("conv3d", lambda: nn.Conv3d(4, 8, 3, padding=1), (4, 4, 8, 8, 8)),
    ("conv3d-stride2", lambda: nn.Conv3d(4, 8, 3, stride=2, padding=1), (4, 4, 8, 8, 8)),
    ("convtranspose2d", lambda: nn.ConvTranspose2d(16, 8, 3, padding=1), (8, 16, 8, 8)),
    ("convtranspose2d-stride2", lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
     (8, 16, 8, 8)),
    ("convtranspose2d-groups2", lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1,
                                                          groups=2), (8, 16, 8, 8)),
):
    add(_cid, _make, lambda shape=_shape: (_g(*shape, seed=2),))


# Embedding: forward moments only (integer indices carry no gradient)
def _embedding(std: float) -> nn.Module:
    emb = nn.Embedding(1000, 64)
    if std != 1.0:
        with torch.no_grad():
            emb.weight.mul_(std).add_(0.1)
    return emb


for _std in (1.0, 0.02):
    add(f"embedding-std{_std}", lambda std=_std: _embedding(std),
        lambda: (torch.randint(0, 1000, (64, 32), generator=torch.Generator().manual_seed(3)),),
        srcs=())

# Elementwise activations at input variance 0.25, 1, 4
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "gelu": nn.GELU,
    "silu": nn.SiLU, "mish": nn.Mish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus, "hardtanh": nn.Hardtanh, "hardswish": nn.Hardswish, "selu": nn.SELU,
}
for _name, _make in ACTIVATIONS.items():
    for _var in (0.25, 1.0, 4.0):
        add(f"{_name}-var{_var}", _make,
            lambda var=_var: (_g(256, 128, seed=4, std=math.sqrt(var)),))
add("gelu-tanh-approx", lambda: nn.GELU(approximate="tanh"), lambda: (_g(256, 128, seed=4),))
add("relu-functional", lambda: Fn(F.relu), lambda: (_g(256, 128, seed=4, std=2.0, mean=0.5),))


# Normalisation
def _bn_eval(bn: nn.Module, spread: float) -> nn.Module:
    """Eval-mode BatchNorm with running stats and affine parameters away from (0, 1)."""
    gen = torch.Generator().manual_seed(5)
    c = bn.num_features  # type: ignore[union-attr]
    with torch.no_grad():
        bn.running_mean.copy_(0.5 * torch.randn(c, generator=gen))  # type: ignore[operator]
        bn.running_var.copy_(torch.exp(spread * torch.randn(c, generator=gen)))  # type: ignore[operator]
        bn.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=gen))  # type: ignore[operator]
        bn.bias.copy_(0.1 * torch.randn(c, generator=gen))  # type: ignore[operator]
    return bn.eval()


add("batchnorm1d-train", lambda: nn.BatchNorm1d(64), lambda: (_g(256, 64, seed=6, std=2.0,
                                                                     mean=0.5),))
add("batchnorm2d-train", lambda: nn.BatchNorm2d(8), lambda: (_g(16, 8, 8, 8, seed=6, std=2.0),))
add("batchnorm2d-train-var0.25", lambda: nn.BatchNorm2d(8),
    lambda: (_g(16, 8, 8, 8, seed=6, std=0.5),))
add("batchnorm1d-eval", lambda: _bn_eval(nn.BatchNorm1d(64), 0.4),
    lambda: (_g(256, 64, seed=6),), eval_mode=True)
add("batchnorm2d-eval", lambda: _bn_eval(nn.BatchNorm2d(16), 0.4),
    lambda: (_g(16, 16, 8, 8, seed=6),), eval_mode=True)
add("batchnorm2d-eval-widespread", lambda: _bn_eval(nn.BatchNorm2d(16), 1.5),
    lambda: (_g(16, 16, 8, 8, seed=6),), eval_mode=True, )
add("layernorm", lambda: nn.LayerNorm(128), lambda: (_g(256, 128, seed=6, std=2.0, mean=0.5),))
add("layernorm-var0.25", lambda: nn.LayerNorm(128), lambda: (_g(256, 128, seed=6, std=0.5),))
add("groupnorm", lambda: nn.GroupNorm(4, 16), lambda: (_g(16, 16, 8, 8, seed=6, std=2.0),))
add("rmsnorm", lambda: nn.RMSNorm(128), lambda: (_g(256, 128, seed=6, std=2.0),))
add("rmsnorm-var0.25", lambda: nn.RMSNorm(128), lambda: (_g(256, 128, seed=6, std=0.5),))
add("rmsnorm-by-hand", lambda: Fn(_rms_norm_by_hand), lambda: (_g(256, 128, seed=6, std=2.0),))
add("rmsnorm-by-hand-var0.25", lambda: Fn(_rms_norm_by_hand),
    lambda: (_g(256, 128, seed=6, std=0.5),))

# Dropout (train)
for _p in (0.1, 0.5):
    add(f"dropout-p{_p}", lambda p=_p: nn.Dropout(p), lambda: (_g(256, 128, seed=7),))

# Pooling and averaging
_IMG = (16, 8, 16, 16)
add("maxpool2d-k2", lambda: nn.MaxPool2d(2), lambda: (_g(*_IMG, seed=8),))
add("maxpool2d-k3s2", lambda: nn.MaxPool2d(3, stride=2, padding=1), lambda: (_g(*_IMG, seed=8),),
    )
add("avgpool2d-k2", lambda: nn.AvgPool2d(2), lambda: (_g(*_IMG, seed=8),))
add("adaptiveavgpool2d-1x1", lambda: nn.AdaptiveAvgPool2d((1, 1)), lambda: (_g(*_IMG, seed=8),))
add("global-mean", lambda: Fn(lambda x: x.mean((2, 3))), lambda: (_g(*_IMG, seed=8),))

# Routing
_SMALL = (16, 8, 4, 4)
add("flatten", lambda: Fn(lambda x: x.flatten(1)), lambda: (_g(*_SMALL, seed=9),))
add("reshape", lambda: Fn(lambda x: x.reshape(16, 8, 16)), lambda: (_g(*_SMALL, seed=9),))
add("permute", lambda: Fn(lambda x: x.permute(0, 2, 3, 1)), lambda: (_g(*_SMALL, seed=9),))
add("slice", lambda: Fn(lambda x: x[:, 2:6]), lambda: (_g(*_SMALL, seed=9),))
add("cat", lambda: Fn(lambda a, b: torch.cat([a, b], dim=1)),
    lambda: (_g(16, 3, 4, 4, seed=9), _g(16, 5, 4, 4, seed=10)), srcs=("a", "b"))
add("split-cat", lambda: Fn(_split_swap), lambda: (_g(*_SMALL, seed=9),))
add("split-first", lambda: Fn(_split_first), lambda: (_g(*_SMALL, seed=9),))

# Residual add x + f(x)
add("residual-linear", lambda: Residual(nn.Linear(128, 128)), lambda: (_g(256, 128, seed=11),))
add("residual-mlp-kaiming", lambda: Residual(nn.Sequential(
    _init(nn.Linear(128, 256), "kaiming_in"), nn.ReLU(), _init(nn.Linear(256, 128), "kaiming_in"))),
    lambda: (_g(256, 128, seed=11),))

# Gate a * sigmoid(b)
for _var in (1.0, 4.0):
    add(f"gate-var{_var}", lambda: Fn(lambda a, b: a * torch.sigmoid(b)),
        lambda var=_var: (_g(256, 128, seed=12, std=1.5),
                          _g(256, 128, seed=13, std=math.sqrt(var))), srcs=("a", "b"))

# Softmax over T
for _t in (4, 16, 64):
    add(f"softmax-T{_t}", lambda: nn.Softmax(dim=-1),
        lambda t=_t: (_g(16384 // t, t, seed=14),))
add("softmax-T16-var4", lambda: nn.Softmax(dim=-1), lambda: (_g(1024, 16, seed=14, std=2.0),))

# Attention
for _causal in (False, True):
    add(f"sdpa{'-causal' if _causal else ''}",
        lambda causal=_causal: Fn(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal)),
        lambda: tuple(_g(8, 4, 32, 16, seed=15 + i) for i in range(3)), srcs=("q", "k", "v"))
add("sdpa-logitvar4", lambda: Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
    lambda: tuple(_g(8, 4, 32, 16, seed=15 + i, std=math.sqrt(2.0) if i < 2 else 1.0)
                  for i in range(3)),
    srcs=("q", "k", "v"))
add("mha-self", lambda: SelfAttention(64, 4), lambda: (_g(8, 32, 64, seed=18),))

# Matmul of two activations
add("matmul", lambda: Fn(lambda a, b: a @ b),
    lambda: (_g(16, 32, 24, seed=19), _g(16, 24, 40, seed=20, std=1.5)), srcs=("a", "b"))


# ---------------------------------------------------------------------------
# Static estimate and brute force


def _numel(shape: Any) -> int:
    return math.prod(shape) if shape else 1


def build(case: Case) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    body = case.body()
    inputs = case.inputs()
    with torch.no_grad():
        y = body(*inputs)
    model = HARNESS[len(inputs)](body, int(y.shape[-1]))
    if case.eval_mode:
        model.eval()
    names = list(inspect.signature(model.forward).parameters)
    return model, inputs, names


@dataclass
class Numbers:
    gains: dict[str, float]
    second: float | None


def static(case: Case) -> Numbers:
    model, inputs, names = build(case)
    if case.eval_mode:
        # analyze() puts the model in train mode; eval rules are reachable only here
        traced = trace_model(model, inputs, method=TRACER, allow_run=False)
        est = estimate(traced, inputs)
        readout = next(r.name for r in traced.records() if r.module == "readout")
        y = traced.node(readout).inputs[0]
        sq = {n: est.sq_norm[n] for n in [*names, y]}
        assert all(est.understood.get(n, True) for n in est.understood), est.unknown_ops
    else:
        report = gradscope.analyze(model, inputs, probe=False, tracer=TRACER)
        layers = {layer.name: layer for layer in report.layers}
        unknown = [f"{layer.name}:{layer.op}" for layer in report.layers if not layer.understood]
        assert not unknown, f"ops the estimator does not model: {unknown}"
        readout = next(layer for layer in report.layers if layer.module == "readout")
        y = readout.inputs[0]
        sq = {}
        for n in [*names, y]:
            rms = layers[n].static_grad_rms
            sq[n] = math.nan if rms is None else rms ** 2 * _numel(layers[n].shape)
        traced = trace_model(model, inputs, method=TRACER, allow_run=False)
        est = estimate(traced, inputs)
    gains = {n: sq[n] / sq[y] for n in names if n in case.srcs}
    mom = est.moments.get(y)
    return Numbers(gains, None if mom is None else mom[1])


def measured(case: Case) -> Numbers:
    model, inputs, names = build(case)
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple[Any, ...]) -> None:
        y = args[0]
        if y.requires_grad:
            y.retain_grad()
        caught.append(y)

    handle = model.readout.register_forward_pre_hook(catch)
    sums = dict.fromkeys([*names, "y"], 0.0)
    second = 0.0
    try:
        for seed in range(SEEDS):
            caught.clear()
            xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            torch.manual_seed(100 + seed)
            out = model(*xs)
            y = caught[0]
            r = torch.randn(out.shape, generator=torch.Generator().manual_seed(200 + seed))
            (out * r).sum().backward()
            second += float(y.detach().double().pow(2).mean()) / SEEDS
            assert y.grad is not None
            sums["y"] += float(y.grad.double().pow(2).sum())
            for name, t in zip(names, xs, strict=True):
                if t.grad is not None:
                    sums[name] += float(t.grad.double().pow(2).sum())
    finally:
        handle.remove()
    return Numbers({n: sums[n] / sums["y"] for n in names if n in case.srcs}, second)


@functools.cache
def numbers(case_id: str) -> tuple[Numbers, Numbers]:
    case = BY_ID[case_id]
    return static(case), measured(case)


BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"


def _params(kind: str) -> list[Any]:
    params = []
    for case in CASES:
        checks = case.srcs if kind == "gain" else (("fwd",) if case.forward else ())
        for check in checks:
            reason = case.xfail.get(check)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            label = case.id if kind == "fwd" or case.srcs == ("x",) else f"{case.id}-{check}"
            params.append(pytest.param(case.id, check, marks=marks, id=label))
    return params


def _close(est: float | None, true: float | None, what: str) -> None:
    assert est is not None and true is not None, f"{what}: estimate {est}, measured {true}"
    assert est > 0 and true > 0, f"{what}: estimate {est:.4g}, measured {true:.4g}"
    err = math.log10(est / true)
    assert abs(err) <= TOL, f"{what}: estimate {est:.4g} vs measured {true:.4g} " \
                            f"(log10 ratio {err:+.2f})"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("case_id", "src"), _params("gain"))
def test_backward_gain(case_id: str, src: str) -> None:
    est, true = numbers(case_id)
    _close(est.gains[src], true.gains[src], f"{case_id} squared-norm gain to {src}")


@pytest.mark.parametrize(("case_id", "check"), _params("fwd"))
def test_forward_second_moment(case_id: str, check: str) -> None:
    est, true = numbers(case_id)
    _close(est.second, true.second, f"{case_id} E[y^2]")


def table() -> list[tuple[str, str, float, float]]:
    """Every check's (case, check, estimate, measured); ``python tests/test_estimate_ops.py``."""
    rows = []
    for case in CASES:
        est, true = numbers(case.id)
        for src in case.srcs:
            rows.append((case.id, f"G[{src}]", est.gains[src], true.gains[src]))
        if case.forward:
            rows.append((case.id, "E[y^2]", est.second or math.nan, true.second or math.nan))
    return rows


if __name__ == "__main__":
    for cid, check, e, t in table():
        err = math.log10(e / t) if e > 0 and t > 0 else math.nan
        flag = "" if abs(err) <= TOL else "  <-- off"
        print(f"{cid:32s} {check:8s} est {e:11.4g}  meas {t:11.4g}  {err:+.2f}{flag}")


def test_relu6_module_is_understood() -> None:
    """nn.ReLU6 carries Hardtanh's min_val/max_val attributes; its bounds are fixed."""
    from torch import nn

    from gradscope.estimate.engine import estimate
    from gradscope.tracing import trace_model

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    est = estimate(trace_model(model, (x,)), (x,))
    assert est.unknown_ops == [] and all(est.understood.values())
