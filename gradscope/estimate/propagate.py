"""Static estimate: forward second moments and backward gradient gains over the graph.

Mean-field propagation (SIGNAL_PROPAGATION.md): a forward sweep carries each
node's output mean m and second moment q (over units and samples); a
backward sweep carries S, the expected squared norm of dLoss/d(node output)
relative to the model output. Working in squared norms rather than
per-element variances makes routing ops (reshape, slicing, concat,
broadcasting) exactly gain 1, so only ops that really scale the gradient
have a gain. Per-element RMS, the contract's ``static_grad_rms``, is derived
at the end.

A second backward sweep, the *structural* gain, applies only the gains of
averaging ops (mean, average pooling): they shrink the gradient norm by
design without starving any weight. ``health = S / structural`` is what the
vanishing and exploding rules judge, so global average pooling or a width
change is never mistaken for attenuation.

Each op's rule lives in ``FORWARD``/``BACKWARD`` by the node's canonical key
(``gradscope.tracing.ops``); an unknown op passes the signal through with
gain 1 and is counted as not understood.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from gradscope.estimate.activations import activation_moments
from gradscope.tracing.graph import Ref, TracedModel, node_record

EPS = 1e-12

#: (mean, second moment) of a node's output; None where unknown or not floating.
Mom = tuple[float, float]
UNIT: Mom = (0.0, 1.0)


@dataclass
class StaticEstimate:
    """Per-node forward moments and backward gains, and what they imply."""

    moments: dict[str, Mom | None] = field(default_factory=dict)
    sq_norm: dict[str, float] = field(default_factory=dict)
    structural: dict[str, float] = field(default_factory=dict)
    understood: dict[str, bool] = field(default_factory=dict)
    grad_rms: dict[str, float | None] = field(default_factory=dict)
    health: dict[str, float | None] = field(default_factory=dict)
    coverage: float = 1.0
    unknown_ops: list[str] = field(default_factory=list)
    #: Recurrent layers' unrolls by node: step gain through time, steps, what dominates.
    recurrent: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Small helpers


def numel(shape: list[int] | None) -> int | None:
    if shape is None:
        return None
    return math.prod(shape) if shape else 1


#: Declared init moments of meta tensors, by id, for the estimate being run
#: (see gradscope.meta); a context variable so concurrent estimates stay apart.
_DECLARED: contextvars.ContextVar[dict[int, Mom] | None] = contextvars.ContextVar(
    "declared", default=None)


#: Measured moments of weight tensors for the estimate being run: each weight is
#: read by several rules (forward, backward, spread), and reading is the hot spot.
_STATS: contextvars.ContextVar[dict[tuple[int, int], Mom] | None] = contextvars.ContextVar(
    "stats", default=None)


#: Moments that replace a weight's own for the estimate being run, by id: how a
#: recommended re-initialisation is tried on a copy without touching the model
#: (gradscope.fixes).
_OVERRIDES: contextvars.ContextVar[dict[int, Mom] | None] = contextvars.ContextVar(
    "overrides", default=None)


def tensor_stats(t: torch.Tensor) -> Mom | None:
    """(mean, second moment) of a tensor: measured, or declared for meta tensors.

    None for meta tensors whose initialisation was not seen: callers then use
    the module's documented default.
    """
    overrides = _OVERRIDES.get()
    if overrides and id(t) in overrides:
        return overrides[id(t)]
    if t.is_meta:
        return (_DECLARED.get() or {}).get(id(t))
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return None
    cache = _STATS.get()
    if cache is not None:
        key = (id(t), t._version)
        if key not in cache:
            cache[key] = _measure(t)
        return cache[key]
    return _measure(t)


def _measure(t: torch.Tensor) -> Mom:
    with torch.no_grad():
        x = t.detach().to(torch.float64)
        return float(x.mean()), float((x * x).mean())


def var_of(m: Mom) -> float:
    return max(m[1] - m[0] * m[0], 0.0)


class Ctx:
    """What an op rule may read about its node: args, moments, weights, shapes."""

    def __init__(self, est: _Estimator, name: str) -> None:
        self.est = est
        self.name = name
        self.data = node_record(est.graph, name)
        self.args: tuple[Any, ...] = tuple(self.data.args)
        self.kwargs: dict[str, Any] = dict(self.data.kwargs)
        # Any: nn.Module's __getattr__ types every attribute as Tensor | Module.
        self.module: Any = est.traced.modules.get(self.data.module or "") \
            if self.data.kind == "call_module" else None

    # arguments -----------------------------------------------------------
    def arg(self, index: int, key: str | None = None, default: Any = None) -> Any:
        if key is not None and key in self.kwargs:
            return self.kwargs[key]
        return self.args[index] if index < len(self.args) else default

    def tensor_refs(self) -> list[str]:
        """Referenced float nodes in argument order (weights included)."""
        return [r for r in self.data.inputs if node_record(self.est.graph, r).is_float]

    def activations_in(self) -> list[str]:
        """Referenced float nodes that are not weights: the signal inputs."""
        return [r for r in self.tensor_refs() if node_record(self.est.graph, r).role != "param"]

    def first(self) -> str | None:
        ins = self.activations_in()
        return ins[0] if ins else None

    def mom(self, value: Any) -> Mom | None:
        """Moments of an argument: a node reference or a Python number."""
        if isinstance(value, Ref):
            found = self.est.moments.get(value.name)
            if found is None and node_record(self.est.graph, value.name).is_float:
                return UNIT  # unknown float values: the unit-variance prior
            return found
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value), float(value) ** 2
        return None

    def shape(self, ref: str | None = None) -> list[int] | None:
        return node_record(self.est.graph, ref or self.name).shape

    # weights -------------------------------------------------------------
    def weight(self, attr: str = "weight", index: int | None = None) -> torch.Tensor | None:
        """A weight tensor: the module's attribute, else the ``index``-th argument's tensor."""
        if self.module is not None:
            w = getattr(self.module, attr, None)
            return w if isinstance(w, torch.Tensor) else None
        if index is not None:
            ref = self.arg(index, attr)
            if isinstance(ref, Ref):
                return self.est.tensor_of(ref.name)
        return None

    def param_by_suffix(self, suffix: str) -> torch.Tensor | None:
        """A weight among the referenced parameters whose name ends with ``suffix``."""
        if self.module is not None:
            w = getattr(self.module, suffix, None)
            return w if isinstance(w, torch.Tensor) else None
        for ref in self.data.inputs:
            node = node_record(self.est.graph, ref)
            if node.role == "param" and str(node.module or ref).endswith(suffix):
                return self.est.tensor_of(ref)
        return None


def _wstats(t: torch.Tensor | None, default: Mom) -> Mom:
    if t is None:
        return default
    stats = tensor_stats(t)
    return stats if stats is not None else default


# ---------------------------------------------------------------------------
# Op rules: forward returns the output moments; backward returns S-gains per input.

Forward = Callable[[Ctx], "Mom | None"]
Backward = Callable[[Ctx], "dict[str, float]"]
FORWARD: dict[str, Forward] = {}
BACKWARD: dict[str, Backward] = {}


def rule(*keys: str) -> Callable[[Any], Any]:
    def deco(cls: Any) -> Any:
        for key in keys:
            FORWARD[key] = cls.forward
            BACKWARD[key] = cls.backward
        return cls

    return deco


def _pass_forward(ctx: Ctx) -> Mom | None:
    first = ctx.first()
    return ctx.est.moments.get(first) if first else None


def _pass_backward(ctx: Ctx) -> dict[str, float]:
    return {r: 1.0 for r in ctx.activations_in()}


def _dense(ctx: Ctx, w: torch.Tensor | None, fan_in: int, bias: torch.Tensor | None,
           x: str | None, default_var: float | None = None,
           valid: float = 1.0) -> tuple[Mom | None, float]:
    """Moments out and S-gain back of y = W x + b with ``fan_in`` weights per output unit.

    ``valid`` is the share of those weights that meet real inputs (convolution
    padding); it scales both directions.
    """
    if default_var is None:
        default_var = 1.0 / (3.0 * max(fan_in, 1))  # PyTorch's default (kaiming_uniform a=sqrt 5)
    wm, w2 = _wstats(w, (0.0, default_var))
    bm, b2 = _wstats(bias, (0.0, 0.0)) if bias is not None else (0.0, 0.0)
    xm = ctx.est.moments.get(x) if x else None
    fan = fan_in * valid
    gain = fan * w2
    if xm is None:
        return None, gain
    mean = fan * wm * xm[0] + bm
    var = max(fan * (w2 * xm[1] - wm * wm * xm[0] * xm[0]), 0.0) + max(b2 - bm * bm, 0.0)
    return (mean, var + mean * mean), gain


@rule("linear")
class _Linear:
    @staticmethod
    def _parts(ctx: Ctx) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        w = ctx.weight("weight", 1)
        b = ctx.weight("bias", 2)
        if w is not None:
            fan_in = int(w.shape[-1])
        else:
            shape = ctx.shape(ctx.first())
            fan_in = int(shape[-1]) if shape else 1
        return w, b, fan_in

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        w, b, fan_in = _Linear._parts(ctx)
        return _dense(ctx, w, fan_in, b, ctx.first())[0]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        w, b, fan_in = _Linear._parts(ctx)
        first = ctx.first()
        return {first: _dense(ctx, w, fan_in, b, first)[1]} if first else {}


@rule("addmm")
class _Addmm:
    """``addmm(bias, x, W)`` with W of shape (in, out): Hugging Face's Conv1D."""

    @staticmethod
    def _parts(ctx: Ctx) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None, int]:
        w = ctx.weight("mat2", 2)
        b = ctx.weight("input", 0)
        x_ref = ctx.arg(1, "mat1")
        x = x_ref.name if isinstance(x_ref, Ref) else None
        if w is not None:
            fan_in = int(w.shape[0])
        else:
            shape = ctx.shape(x) if x else None
            fan_in = int(shape[-1]) if shape else 1
        return w, b, x, fan_in

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        w, b, x, fan_in = _Addmm._parts(ctx)
        return _dense(ctx, w, fan_in, b, x)[0]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        w, b, x, fan_in = _Addmm._parts(ctx)
        return {x: _dense(ctx, w, fan_in, b, x)[1]} if x else {}


@rule("conv")
class _Conv:
    @staticmethod
    def _parts(ctx: Ctx) -> tuple[torch.Tensor | None, torch.Tensor | None, int, bool]:
        w = ctx.weight("weight", 1)
        b = ctx.weight("bias", 2)
        transposed = bool(ctx.arg(6, "transposed", False)) if ctx.module is None and \
            ctx.data.op in ("convolution", "_convolution") else False
        fan_in = int(w[0].numel()) if w is not None else 1
        return w, b, fan_in, transposed

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        w, b, fan_in, transposed = _Conv._parts(ctx)
        if transposed:
            return _ConvTranspose.forward(ctx)
        return _dense(ctx, w, fan_in, b, ctx.first(), valid=_conv_valid_fraction(ctx, w))[0]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        w, b, fan_in, transposed = _Conv._parts(ctx)
        if transposed:
            return _ConvTranspose.backward(ctx)
        first = ctx.first()
        if not first:
            return {}
        return {first: _dense(ctx, w, fan_in, b, first,
                              valid=_conv_valid_fraction(ctx, w))[1]}


def _tuple(value: Any, n: int, default: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and \
            all(isinstance(v, int) for v in value):
        return tuple(value)
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0],) * n
    return (default,) * n


def _conv_valid_fraction(ctx: Ctx, w: torch.Tensor | None) -> float:
    """Share of (output position, kernel tap) pairs that land on a real input, not padding.

    Zero padding starves the border: with 3x3 kernels on 16x16 maps, 8% of the
    taps read zeros, which compounds to a factor 5 in the gradient over 20 layers.
    The same share scales the forward fan-in and the backward fan-out.
    """
    first = ctx.first()
    in_shape, out_shape = (ctx.shape(first) if first else None), ctx.shape()
    if w is None or in_shape is None or out_shape is None or w.dim() < 3:
        return 1.0
    n = w.dim() - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    if ctx.module is not None:
        if getattr(ctx.module, "padding_mode", "zeros") != "zeros":
            return 1.0
        stride = _tuple(ctx.module.stride, n, 1)
        dilation = _tuple(ctx.module.dilation, n, 1)
        padding_value = ctx.module.padding
    else:
        stride = _tuple(ctx.arg(3, "stride", 1), n, 1)
        padding_value = ctx.arg(4, "padding", 0)
        dilation = _tuple(ctx.arg(5, "dilation", 1), n, 1)
    if padding_value == "valid":
        return 1.0
    if padding_value == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    else:
        padding = _tuple(padding_value, n, 0)
    share = 1.0
    for dim in range(n):
        size_in, size_out = int(in_shape[-n + dim]), int(out_shape[-n + dim])
        hits = 0
        for tap in range(kernel[dim]):
            offset = tap * dilation[dim] - padding[dim]
            # output positions o with 0 <= o*stride + offset < size_in
            lo = max(0, -(offset // stride[dim]) if offset < 0 else 0)
            while lo * stride[dim] + offset < 0:
                lo += 1
            hi = min(size_out - 1, (size_in - 1 - offset) // stride[dim])
            hits += max(0, hi - lo + 1)
        share *= hits / max(size_out * kernel[dim], 1)
    return share


@rule("conv_transpose")
class _ConvTranspose:
    """Weight (in, out/groups, *k): each input feeds ``out/groups * prod(k)`` outputs."""

    @staticmethod
    def _fans(ctx: Ctx) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
        w = ctx.weight("weight", 1)
        b = ctx.weight("bias", 2)
        first = ctx.first()
        n_in, n_out = numel(ctx.shape(first)) if first else None, numel(ctx.shape())
        if w is None:
            return None, b, 1.0, 1.0
        fan_back = float(w[0].numel())  # outputs each input element reaches
        ratio = (n_in / n_out) if n_in and n_out else 1.0
        # per output: (weights reaching it) = fan_back * n_in / n_out
        return w, b, fan_back * ratio, fan_back

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        w, b, fan_fwd, _ = _ConvTranspose._fans(ctx)
        return _dense(ctx, w, max(round(fan_fwd), 1), b, ctx.first())[0]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        w, _, fan_fwd, _ = _ConvTranspose._fans(ctx)
        first = ctx.first()
        if not first:
            return {}
        _, w2 = _wstats(w, (0.0, 1.0 / (3.0 * max(fan_fwd, 1.0))))
        # S_in / S_out = (n_in * fan_back * w2) / n_out = fan_fwd * w2
        return {first: fan_fwd * w2}


@rule("embedding")
class _Embedding:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        w = ctx.weight("weight", 0)
        return _wstats(w, (0.0, 1.0))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {}  # integer indices carry no gradient


_ACT_PARAMS = ("negative_slope", "alpha", "min_val", "max_val", "beta", "threshold",
               "approximate", "lambd", "scale")
_ACT_POSITIONAL = {"leaky_relu": "negative_slope", "elu": "alpha", "celu": "alpha",
                   "hardtanh": "min_val", "softplus": "beta", "hardshrink": "lambd",
                   "softshrink": "lambd"}


def _activation_params(ctx: Ctx, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if ctx.module is not None:
        for attr in _ACT_PARAMS:
            value = getattr(ctx.module, attr, None)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                params[attr] = value
        if name == "prelu" and isinstance(getattr(ctx.module, "weight", None), torch.Tensor):
            params["negative_slope"] = float(ctx.module.weight.detach().float().mean())
        return params
    for attr in _ACT_PARAMS:
        if attr in ctx.kwargs and isinstance(ctx.kwargs[attr], (int, float, str)):
            params[attr] = ctx.kwargs[attr]
    positional = _ACT_POSITIONAL.get(name)
    if positional and len(ctx.args) > 1 and isinstance(ctx.args[1], (int, float)) \
            and not isinstance(ctx.args[1], bool):
        params[positional] = float(ctx.args[1])
    if name == "hardtanh" and len(ctx.args) > 2 and isinstance(ctx.args[2], (int, float)):
        params["max_val"] = float(ctx.args[2])
    if name == "prelu":
        w = ctx.weight("weight", 1)
        if w is not None and not w.is_meta:
            params["negative_slope"] = float(w.detach().float().mean())
    return params


#: Gauss-Hermite nodes (probabilists') for averaging over the spread of unit means.
_SPREAD_NODES = [(-2.8569700138728056, 0.011257411327720691),
                 (-1.3556261799742657, 0.2220759220056126),
                 (0.0, 0.5333333333333333),
                 (1.3556261799742657, 0.2220759220056126),
                 (2.8569700138728056, 0.011257411327720691)]


def _act(ctx: Ctx) -> tuple[Any, str | None]:
    """Activation moments, averaged over units whose means differ (the spread).

    After a layer fed by non-centred inputs (ReLU outputs), each unit has its
    own mean: z_c ~ N(m_c, v) with m_c ~ N(m, b). Treating all units as one
    N(m, v + b) is wrong for a nonlinearity; averaging the per-unit moments over
    m_c is right.
    """
    name = ctx.data.key.split(":", 1)[1]
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None:
        return None, first
    params = _activation_params(ctx, name)
    spread = ctx.est.spread.get(first or "", 0.0)
    within = max(var_of(xm) - spread, 0.0)
    if spread <= 1e-3 * max(var_of(xm), EPS):
        return activation_moments(name, xm[0], var_of(xm), **params), first
    sd = math.sqrt(spread)
    mean = second = grad = centre = 0.0
    for node, weight in _SPREAD_NODES:
        mom = activation_moments(name, xm[0] + sd * node, within, **params)
        mean += weight * mom.mean
        second += weight * mom.second
        grad += weight * mom.grad_second
        centre += weight * mom.mean * mom.mean
    result = type(mom)(mean, second, grad)
    ctx.est.pending_spread = max(centre - mean * mean, 0.0)
    return result, first


class _Activation:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        moments, _ = _act(ctx)
        return (moments.mean, moments.second) if moments is not None else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        moments, first = _act(ctx)
        if first is None:
            return {}
        return {first: moments.grad_second if moments is not None else 1.0}


def _dropout_p(ctx: Ctx) -> float:
    if ctx.module is not None:
        return float(ctx.module.p) if ctx.module.training else 0.0
    p = ctx.arg(1, "p", 0.5)
    train = ctx.arg(2, "training", ctx.kwargs.get("train", True))
    if ctx.data.op == "native_dropout":
        train = ctx.arg(2, "train", True)
    if not isinstance(p, (int, float)) or train is False:
        return 0.0
    return float(p)


@rule("dropout")
class _Dropout:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        p = _dropout_p(ctx)
        return None if xm is None else (xm[0], xm[1] / max(1.0 - p, EPS))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        p = _dropout_p(ctx)
        return {r: 1.0 / max(1.0 - p, EPS) for r in ctx.activations_in()[:1]}


def _norm_affine(ctx: Ctx) -> tuple[Mom, Mom]:
    gamma = ctx.param_by_suffix("weight")
    beta = ctx.param_by_suffix("bias")
    return _wstats(gamma, (1.0, 1.0)), _wstats(beta, (0.0, 0.0))


def _bn_training(ctx: Ctx) -> bool:
    if ctx.module is not None:
        running = getattr(ctx.module, "running_var", None)
        return bool(ctx.module.training or running is None)
    op = ctx.data.op
    if op in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update"):
        return False
    flag = ctx.arg(5, "training")
    return flag if isinstance(flag, bool) else True


def _bn_eval(ctx: Ctx, xm: Mom, eps: float) -> tuple[float, Mom]:
    """BatchNorm with running statistics: a fixed per-channel affine map.

    Averaged per channel, not with channel-averaged statistics: 1/mean(rv) is
    far from mean(1/rv) when running variances differ between channels.
    """
    rv = ctx.param_by_suffix("running_var")
    rm = ctx.param_by_suffix("running_mean")
    gamma = ctx.param_by_suffix("weight")
    beta = ctx.param_by_suffix("bias")
    known = [t for t in (rv, rm, gamma, beta) if t is not None]
    if rv is None or any(t.is_meta for t in known):
        (_, g2), (bm, b2) = _norm_affine(ctx)
        ratio = g2 / (1.0 + eps)
        return ratio, (bm, ratio * xm[1] + b2)
    with torch.no_grad():
        var_c = rv.detach().double() + eps
        mean_c = rm.detach().double() if rm is not None else torch.zeros_like(var_c)
        g = gamma.detach().double() if gamma is not None else torch.ones_like(var_c)
        b = beta.detach().double() if beta is not None else torch.zeros_like(var_c)
        scale2 = g * g / var_c
        shift = g * (xm[0] - mean_c) / var_c.sqrt() + b
        q_out = float((shift * shift + scale2 * var_of(xm)).mean())
        return float(scale2.mean()), (float(shift.mean()), q_out)


@rule("batch_norm", "layer_norm", "group_norm", "instance_norm")
class _Norm:
    """Normalisation divides the signal, and so the gradient, by the input's std."""

    @staticmethod
    def _gain(ctx: Ctx) -> tuple[float, Mom] | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        (_, g2), (bm, b2) = _norm_affine(ctx)
        eps = 1e-5
        if ctx.data.key == "batch_norm" and not _bn_training(ctx):
            return _bn_eval(ctx, xm, eps)
        var = var_of(xm)
        if ctx.data.key == "batch_norm":
            # BatchNorm normalises each channel by its own variance: the spread of
            # channel means is removed first, and does not divide the gradient.
            var = max(var - ctx.est.spread.get(ctx.first() or "", 0.0), 0.0)
        return g2 / (var + eps), (bm, g2 + b2)

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        got = _Norm._gain(ctx)
        return got[1] if got else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        got = _Norm._gain(ctx)
        first = ctx.first()
        return {first: got[0] if got else 1.0} if first else {}


@rule("rms_norm")
class _RMSNorm:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        (gm, g2), _ = _norm_affine(ctx)
        return gm * xm[0] / math.sqrt(xm[1] + EPS), g2

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = _pass_forward(ctx)
        (_, g2), _ = _norm_affine(ctx)
        first = ctx.first()
        return {first: g2 / (xm[1] + 1e-6) if xm else 1.0} if first else {}


def _reduction_factor(ctx: Ctx) -> float:
    """How many input elements each output element averages or sums over."""
    first = ctx.first()
    n_in = numel(ctx.shape(first)) if first else None
    n_out = numel(ctx.shape())
    if not n_in or not n_out:
        return 1.0
    return max(n_in / n_out, 1.0)


@rule("avg_pool", "mean")
class _Average:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        n = _reduction_factor(ctx)
        # Averaging keeps each unit's own mean: only the within-unit variance shrinks.
        spread = ctx.est.spread.get(ctx.first() or "", 0.0) if ctx.data.key == "avg_pool" \
            else 0.0
        return xm[0], xm[0] ** 2 + spread + (var_of(xm) - spread) / n

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        n = _reduction_factor(ctx)
        return {r: 1.0 / n for r in ctx.activations_in()[:1]}


@rule("sum")
class _Sum:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        n = _reduction_factor(ctx)
        return n * xm[0], (n * xm[0]) ** 2 + n * var_of(xm)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        n = _reduction_factor(ctx)
        return {r: n for r in ctx.activations_in()[:1]}


def _softmax_size(ctx: Ctx) -> int:
    first = ctx.first()
    shape = ctx.shape(first) if first else None
    if not shape:
        return 1
    dim = ctx.module.dim if ctx.module is not None and getattr(ctx.module, "dim", None) \
        is not None else ctx.arg(1, "dim", -1)
    if not isinstance(dim, int):
        dim = -1
    return int(shape[dim]) if -len(shape) <= dim < len(shape) else 1


@functools.lru_cache(maxsize=4096)
def _softmax_row_terms(n: int, var: float) -> tuple[float, float]:
    """(A, B) for one softmax row over ``n`` Gaussian logits of variance ``var``.

    A = E[sum p^2] (how concentrated the row is); B = E[sum p^2 - 2 sum p^3 +
    (sum p^2)^2], the squared norm of the softmax Jacobian applied to a random
    direction. Closed forms exist only in limits (near-uniform, large n), which
    are off by 3x for short rows or sharp attention, so both are computed by a
    seeded Monte Carlo over rows and cached.
    """
    if n <= 1:
        return 1.0, 0.0
    rows = max(64, 32768 // n)
    generator = torch.Generator().manual_seed(n * 7919 + int(var * 1000))
    logits = torch.randn(rows, n, generator=generator, dtype=torch.float64) * math.sqrt(var)
    p = torch.softmax(logits, dim=-1)
    p2 = (p * p).sum(-1)
    p3 = (p * p * p).sum(-1)
    return float(p2.mean()), float((p2 - 2 * p3 + p2 * p2).mean())


def softmax_terms(n: int, var: float, causal: bool = False) -> tuple[float, float]:
    """Row terms (A, B), averaged over the rows of a causal mask (row i sees i+1 keys)."""
    var = round(min(max(var, 0.0), 50.0), 3)
    if not causal or n <= 1:
        return _softmax_row_terms(max(n, 1), var)
    sizes = sorted({max(1, round(x)) for x in
                    [1 + (n - 1) * k / 47 for k in range(48)]}) if n > 48 else range(1, n + 1)
    terms = [_softmax_row_terms(size, var) for size in sizes]
    return (sum(a for a, _ in terms) / len(terms), sum(b for _, b in terms) / len(terms))


@rule("softmax")
class _Softmax:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        t = _softmax_size(ctx)
        a, _ = softmax_terms(t, var_of(xm) if xm else 0.0)
        return 1.0 / t, a / t

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = _pass_forward(ctx)
        t = _softmax_size(ctx)
        _, b = softmax_terms(t, var_of(xm) if xm else 0.0)
        # dx = p * (dy - <p, dy>): per row E||dx||^2 = B E[dy^2], over t elements
        return {r: b / t for r in ctx.activations_in()[:1]}


@rule("log_softmax")
class _LogSoftmax:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        t = _softmax_size(ctx)
        return -math.log(t), math.log(t) ** 2 + (var_of(xm) if xm else 0.0)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {r: 1.0 for r in ctx.activations_in()[:1]}


def _attention(t: int, d: int, scale: float | None, qm: Mom, km: Mom, vm: Mom,
               causal: bool) -> tuple[Mom, float, float, float]:
    """Output moments and S-gains to (q, k, v) of softmax(q k^T * scale) v.

    Value path: each value row is averaged with weights p, so S_v = A. Query and
    key paths: the softmax Jacobian (B) times the logits' sensitivity
    scale^2 d E[k^2] E[v^2] (resp. E[q^2]). Causal rows see 1..T keys; the
    first sees one and passes no gradient to q or k at all.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(max(d, 1))
    logit_var = scale * scale * d * qm[1] * km[1]
    a, b = softmax_terms(max(t, 1), logit_var, causal)
    out = (vm[0], vm[0] ** 2 + var_of(vm) * a)
    s_qk = scale * scale * d * vm[1] * b
    return out, s_qk * km[1], s_qk * qm[1], a


@rule("sdpa")
class _SDPA:
    @staticmethod
    def _parts(ctx: Ctx) -> tuple[Mom, float, float, float, list[str]] | None:
        refs = [ctx.arg(i) for i in range(3)]
        if not all(isinstance(r, Ref) for r in refs):
            return None
        names = [r.name for r in refs]
        moms = [ctx.mom(r) or UNIT for r in refs]
        kshape = ctx.shape(names[1]) or [1, 1]
        qshape = ctx.shape(names[0]) or [1]
        causal = bool(ctx.arg(5, "is_causal", False))
        scale = ctx.kwargs.get("scale")
        out, sq, sk, sv = _attention(int(kshape[-2]) if len(kshape) > 1 else 1,
                                     int(qshape[-1]), scale if isinstance(scale, float) else None,
                                     moms[0], moms[1], moms[2], causal)  # type: ignore[arg-type]
        return out, sq, sk, sv, names

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        parts = _SDPA._parts(ctx)
        return parts[0] if parts else _pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        parts = _SDPA._parts(ctx)
        if not parts:
            return _pass_backward(ctx)
        _, sq, sk, sv, names = parts
        gains: dict[str, float] = {}
        for name, gain in zip(names, (sq, sk, sv), strict=True):
            gains[name] = gains.get(name, 0.0) + gain
        return gains


@rule("mha")
class _MHA:
    """nn.MultiheadAttention: in-projections, scaled dot-product attention, out-projection."""

    @staticmethod
    def _parts(ctx: Ctx) -> tuple[Mom, dict[str, float]] | None:
        m = ctx.module
        if m is None:
            return None
        refs = [ctx.arg(i, k) for i, k in enumerate(("query", "key", "value"))]
        if not all(isinstance(r, Ref) for r in refs):
            return None
        names = [r.name for r in refs]
        moms = [ctx.est.moments.get(n) for n in names]
        if any(x is None for x in moms):
            return None
        e = int(m.embed_dim)
        if m.in_proj_weight is not None:
            ws = m.in_proj_weight.chunk(3) if not m.in_proj_weight.is_meta else [None] * 3
        else:
            ws = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        kd, vd = (m.kdim, m.vdim)
        fans = (e, kd, vd)
        proj = []
        w2s = []
        for w, fan, mom in zip(ws, fans, moms, strict=True):
            _, w2 = _wstats(w, (0.0, 1.0 / (2.0 * fan)))  # xavier_uniform_ default
            w2s.append(w2)
            proj.append((0.0, fan * w2 * mom[1]))  # type: ignore[index]
        kshape = ctx.shape(names[1]) or [1, 1, 1]
        t = int(kshape[1] if m.batch_first else kshape[0]) if len(kshape) == 3 else \
            int(kshape[0])
        d = e // m.num_heads
        out, sq, sk, sv = _attention(t, d, None, proj[0], proj[1], proj[2], False)
        _, wo2 = _wstats(m.out_proj.weight, (0.0, 1.0 / (3.0 * e)))
        bm, b2 = _wstats(m.out_proj.bias, (0.0, 0.0))
        q_out = e * wo2 * out[1] + b2
        s_attn = e * wo2
        gains: dict[str, float] = {}
        for name, fan, w2, s in zip(names, fans, w2s, (sq, sk, sv), strict=True):
            gains[name] = gains.get(name, 0.0) + s_attn * s * fan * w2 * e / max(fan, 1)
        return (bm, q_out), gains

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        parts = _MHA._parts(ctx)
        return parts[0] if parts else _pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        parts = _MHA._parts(ctx)
        return parts[1] if parts else _pass_backward(ctx)


def _binary(ctx: Ctx) -> tuple[Any, Any]:
    return ctx.arg(0, "input"), ctx.arg(1, "other")


@rule("add", "sub", "rsub")
class _Add:
    """Variances add (independent branches, as in x + f(x)); each input gets the full gradient."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        a, b = _binary(ctx)
        ma, mb = ctx.mom(a), ctx.mom(b)
        alpha = ctx.kwargs.get("alpha", 1.0)
        alpha = float(alpha) if isinstance(alpha, (int, float)) else 1.0
        sign = -1.0 if ctx.data.key in ("sub", "rsub") else 1.0
        if ma is None and mb is None:
            return None
        ma = ma or (0.0, 0.0)
        mb = mb or (0.0, 0.0)
        mean = ma[0] + sign * alpha * mb[0]
        var = var_of(ma) + alpha * alpha * var_of(mb)
        return mean, var + mean * mean

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b = _binary(ctx)
        alpha = ctx.kwargs.get("alpha", 1.0)
        alpha = float(alpha) if isinstance(alpha, (int, float)) else 1.0
        gains: dict[str, float] = {}
        for ref, g in ((a, 1.0), (b, alpha * alpha)):
            if isinstance(ref, Ref) and ref.name in ctx.activations_in():
                gains[ref.name] = gains.get(ref.name, 0.0) + g
        return gains


@rule("mul")
class _Mul:
    """Gates: each factor's gradient is scaled by the other factor's second moment."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        ma, mb = (ctx.mom(v) for v in _binary(ctx))
        if ma is None or mb is None:
            return None
        return ma[0] * mb[0], ma[1] * mb[1]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b = _binary(ctx)
        ma, mb = ctx.mom(a), ctx.mom(b)
        gains: dict[str, float] = {}
        for ref, other in ((a, mb), (b, ma)):
            if isinstance(ref, Ref) and ref.name in ctx.activations_in():
                gains[ref.name] = gains.get(ref.name, 0.0) + (other[1] if other else 1.0)
        return gains


@rule("div")
class _Div:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        ma, mb = (ctx.mom(v) for v in _binary(ctx))
        if ma is None or mb is None or mb[1] <= 0:
            return ma
        return ma[0] / (mb[0] if abs(mb[0]) > EPS else math.sqrt(mb[1])), ma[1] / mb[1]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b = _binary(ctx)
        ma, mb = ctx.mom(a), ctx.mom(b)
        gains: dict[str, float] = {}
        if mb is None or mb[1] <= 0:
            return _pass_backward(ctx)
        if isinstance(a, Ref) and a.name in ctx.activations_in():
            gains[a.name] = 1.0 / mb[1]
        if isinstance(b, Ref) and b.name in ctx.activations_in() and ma is not None \
                and not is_norm_statistic(ctx, b.name):
            gains[b.name] = gains.get(b.name, 0.0) + ma[1] / (mb[1] * mb[1])
        return gains


@functools.lru_cache(maxsize=256)
def _max_order_stats(k: int) -> tuple[float, float]:
    """(E[M], E[M^2]) of the maximum of k standard normals (seeded Monte Carlo, cached)."""
    if k <= 1:
        return 0.0, 1.0
    generator = torch.Generator().manual_seed(k)
    draws = torch.randn(max(2048, 262144 // k), k, generator=generator, dtype=torch.float64)
    top = draws.max(dim=-1).values
    return float(top.mean()), float((top * top).mean())


def _pool_window(ctx: Ctx) -> int:
    """Values each max-pool output is the maximum of."""
    kernel: Any = None
    if ctx.module is not None:
        kernel = getattr(ctx.module, "kernel_size", None)
    elif "adaptive" not in ctx.data.op:
        kernel = ctx.arg(1, "kernel_size")
    first = ctx.first()
    shape = ctx.shape(first) if first else None
    n = len(shape) - 2 if shape and len(shape) > 2 else 1
    if isinstance(kernel, int):
        return kernel ** n
    if isinstance(kernel, (list, tuple)) and kernel and all(isinstance(k, int) for k in kernel):
        return math.prod(kernel) if len(kernel) > 1 else kernel[0] ** n
    return max(round(_reduction_factor(ctx)), 1)


@rule("max_pool")
class _MaxPool:
    """Max pooling: the output is an order statistic; the gradient is routed, norm kept."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        e1, e2 = _max_order_stats(_pool_window(ctx))
        sd = math.sqrt(var_of(xm))
        mean = xm[0] + sd * e1
        return mean, xm[0] ** 2 + 2 * xm[0] * sd * e1 + var_of(xm) * e2

    backward = staticmethod(lambda ctx: {r: 1.0 for r in ctx.activations_in()[:1]})


@rule("neg", "abs", "masked_fill", "max_reduce", "view", "getitem", "split")
class _Route:
    """Ops that move or select values: moments pass, the gradient's squared norm is kept."""

    forward = staticmethod(_pass_forward)
    backward = staticmethod(lambda ctx: {r: 1.0 for r in ctx.activations_in()[:1]})


@rule("cat")
class _Cat:
    @staticmethod
    def _shares(ctx: Ctx) -> dict[str, float]:
        refs = ctx.activations_in()
        sizes = {r: numel(ctx.shape(r)) or 0 for r in refs}
        total = numel(ctx.shape()) or sum(sizes.values()) or 1
        return {r: (sizes[r] / total if sizes[r] else 1.0 / max(len(refs), 1)) for r in refs}

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        shares = _Cat._shares(ctx)
        moms = [(s, ctx.est.moments.get(r)) for r, s in shares.items()]
        moms = [(s, m) for s, m in moms if m is not None]
        if not moms:
            return None
        total = sum(s for s, _ in moms) or 1.0
        return (sum(s * m[0] for s, m in moms if m is not None) / total,
                sum(s * m[1] for s, m in moms if m is not None) / total)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        shares = _Cat._shares(ctx)
        return dict(shares)


@rule("matmul")
class _Matmul:
    @staticmethod
    def _parts(ctx: Ctx) -> tuple[str | None, str | None, Mom | None, Mom | None, int]:
        refs = [r for r in ctx.tensor_refs()]
        a = refs[0] if refs else None
        b = refs[1] if len(refs) > 1 else None
        if ctx.data.op == "baddbmm":
            a, b = (refs[1] if len(refs) > 1 else None), (refs[2] if len(refs) > 2 else None)
        ma = ctx.est.moments.get(a) if a else None
        mb = ctx.est.moments.get(b) if b else None
        shape = ctx.shape(a) if a else None
        k = int(shape[-1]) if shape else 1
        return a, b, ma, mb, k

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        _, _, ma, mb, k = _Matmul._parts(ctx)
        if ma is None or mb is None:
            return ma
        mean = k * ma[0] * mb[0]
        var = k * max(ma[1] * mb[1] - (ma[0] * mb[0]) ** 2, 0.0)
        return mean, var + mean * mean

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b, ma, mb, k = _Matmul._parts(ctx)
        gains: dict[str, float] = {}
        if a and mb is not None:
            gains[a] = k * mb[1]
        if b and ma is not None:
            gains[b] = gains.get(b, 0.0) + k * ma[1]
        return gains


def _power(ctx: Ctx) -> float:
    key = ctx.data.key
    if key == "square":
        return 2.0
    if key == "sqrt":
        return 0.5
    if key == "rsqrt":
        return -0.5
    if key == "reciprocal":
        return -1.0
    exponent = ctx.arg(1, "exponent", 2.0)
    return float(exponent) if isinstance(exponent, (int, float)) else 2.0


_STAT_PASS = frozenset({"add", "view", "clamp", "sqrt", "rsqrt", "reciprocal", "pow"})


def is_norm_statistic(ctx: Ctx, ref: str, depth: int = 5) -> bool:
    """Whether ``ref`` is a normaliser's statistic: mean of squares (+eps, sqrt ...).

    In a hand-written RMSNorm/LayerNorm, ``x * rsqrt(mean(x**2) + eps)``, the
    gradient through the statistic only removes the radial component of the
    direct path's gradient (it is anti-correlated with it); adding its squared
    norm as an independent path would overestimate the gradient at ``x``.
    """
    graph = ctx.est.graph
    node = ref
    for _ in range(depth):
        data = node_record(graph, node)
        if data.key in ("mean", "sum") or data.op in ("var", "std", "var_mean"):
            preds = [p for p in data.inputs if node_record(graph, p).role != "param"]
            if data.op in ("var", "std", "var_mean"):
                return True
            return any(node_record(graph, p).key in ("pow", "square") or
                       (node_record(graph, p).key == "mul" and len(set(
                           node_record(graph, p).inputs)) == 1) for p in preds)
        if data.key not in _STAT_PASS and data.op not in ("var", "std"):
            return False
        preds = [p for p in data.inputs if node_record(graph, p).is_float]
        if not preds:
            return False
        node = preds[0]
    return False


@rule("pow", "square", "sqrt", "rsqrt", "reciprocal")
class _Pow:
    """x**e by the delta method around |x| = sqrt(q); exact second moment for e = 2."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        e = _power(ctx)
        if e == 2.0:
            m, v = xm[0], var_of(xm)
            return xm[1], m ** 4 + 6 * m * m * v + 3 * v * v
        q = max(xm[1], EPS)
        return (q ** (e / 2.0)) * (1.0 if xm[0] >= 0 else -1.0), q ** e

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = _pass_forward(ctx)
        first = ctx.first()
        if first is None or xm is None:
            return _pass_backward(ctx)
        e = _power(ctx)
        if e < 0 and is_norm_statistic(ctx, first):
            return {first: 0.0}
        return {first: e * e * max(xm[1], EPS) ** (e - 1.0)}


@rule("exp")
class _Exp:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        m, v = xm[0], var_of(xm)
        return math.exp(min(m + v / 2, 700.0)), math.exp(min(2 * m + 2 * v, 700.0))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        out = _Exp.forward(ctx)
        first = ctx.first()
        return {first: out[1] if out else 1.0} if first else {}


@rule("log")
class _Log:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = _pass_forward(ctx)
        if xm is None:
            return None
        mid = math.log(max(math.sqrt(xm[1]), EPS))
        return mid, mid * mid

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = _pass_forward(ctx)
        first = ctx.first()
        return {first: 1.0 / max(xm[1], EPS) if xm else 1.0} if first else {}


@rule("clamp")
class _Clamp:
    @staticmethod
    def _moments(ctx: Ctx) -> Any:
        xm = _pass_forward(ctx)
        lo = ctx.arg(1, "min")
        hi = ctx.arg(2, "max")
        if ctx.data.op == "clamp_max":
            lo, hi = None, ctx.arg(1, "max")
        if xm is None:
            return None
        lo = float(lo) if isinstance(lo, (int, float)) else None
        hi = float(hi) if isinstance(hi, (int, float)) else None
        if lo is not None and hi is not None:
            return activation_moments("hardtanh", xm[0], var_of(xm), min_val=lo, max_val=hi)
        if lo is not None:
            mom = activation_moments("relu", xm[0] - lo, var_of(xm))
            return type(mom)(mom.mean + lo, mom.second + 2 * lo * mom.mean + lo * lo,
                             mom.grad_second)
        if hi is not None:
            mom = activation_moments("relu", hi - xm[0], var_of(xm))
            return type(mom)(hi - mom.mean, hi * hi - 2 * hi * mom.mean + mom.second,
                             mom.grad_second)
        return None

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        mom = _Clamp._moments(ctx)
        return (mom.mean, mom.second) if mom is not None else _pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        mom = _Clamp._moments(ctx)
        first = ctx.first()
        return {first: mom.grad_second if mom is not None else 1.0} if first else {}


@rule("where")
class _Where:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        moms = [ctx.mom(ctx.arg(i)) for i in (1, 2)]
        known = [m for m in moms if m is not None]
        if not known:
            return None
        return sum(m[0] for m in known) / len(known), sum(m[1] for m in known) / len(known)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {r: 0.5 for r in ctx.activations_in()}


@rule("detach", "constant")
class _NoGrad:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        if ctx.data.op == "zeros_like":
            return 0.0, 0.0
        if ctx.data.op == "ones_like":
            return 1.0, 1.0
        return _pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {}


def _rnn_entry(ctx: Ctx) -> str:
    """Where the gradient enters an RNN's output sequence: the last step, or every step.

    Read off the graph: if whatever consumes the output sequence keeps fewer
    elements than it has (``out[:, -1]``), or only the final hidden state is used,
    the gradient enters at the end; otherwise all along.
    """
    graph = ctx.est.graph
    numel_out = numel(ctx.shape())
    for succ in graph.successors(ctx.name):
        index = node_record(graph, succ).args[1] if len(node_record(graph, succ).args) > 1 else None
        if node_record(graph, succ).key != "getitem" or index != 0:
            continue
        for consumer in graph.successors(succ):
            n = numel(node_record(graph, consumer).shape)
            if numel_out and n and n * 2 <= numel_out:
                return "last"
        return "uniform"
    return "last"


def _rnn(ctx: Ctx) -> Any:
    from gradscope.estimate.recurrent import estimate_recurrent

    if ctx.name in ctx.est.recurrent:
        return ctx.est.recurrent[ctx.name]  # the unroll is costly: forward and backward share it
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    shape = ctx.shape(first) if first else None
    if xm is None or shape is None or ctx.module is None:
        return None
    batch_first = bool(getattr(ctx.module, "batch_first", False))
    seq_len = int(shape[1] if batch_first and len(shape) == 3 else shape[0])
    result = estimate_recurrent(ctx.module, xm[0], xm[1], seq_len, entry=_rnn_entry(ctx))
    ctx.est.recurrent[ctx.name] = result
    return result


@rule("rnn")
class _RNN:
    """nn.LSTM / nn.GRU / nn.RNN, unrolled over the sequence (gradscope.estimate.recurrent)."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        result = _rnn(ctx)
        return (result.out_mean, result.out_second) if result is not None else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        result = _rnn(ctx)
        first = ctx.first()
        if first is None:
            return {}
        return {first: result.input_gain if result is not None else 1.0}


@rule("rnn_cell")
class _RNNCell:
    """nn.LSTMCell / GRUCell / RNNCell: one step, gains to input, hx and cx."""

    @staticmethod
    def _run(ctx: Ctx) -> tuple[float, float, dict[str, float]] | None:
        from gradscope.estimate.recurrent import estimate_cell

        refs = [r for r in ctx.activations_in()]
        if not refs or ctx.module is None:
            return None
        xm = ctx.est.moments.get(refs[0])
        hm = ctx.est.moments.get(refs[1]) if len(refs) > 1 else (0.0, 0.0)
        cm = ctx.est.moments.get(refs[2]) if len(refs) > 2 else None
        if xm is None or hm is None:
            return None
        return estimate_cell(ctx.module, xm[0], xm[1], hm[1], cm[1] if cm else None)

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        got = _RNNCell._run(ctx)
        return (got[0], got[1]) if got else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        got = _RNNCell._run(ctx)
        refs = ctx.activations_in()
        if got is None:
            return _pass_backward(ctx)
        gains: dict[str, float] = {}
        for ref, role in zip(refs, ("input", "hx", "cx"), strict=False):
            gains[ref] = gains.get(ref, 0.0) + got[2].get(role, 0.0)
        return gains


@rule("l2_normalize")
class _L2Normalize:
    @staticmethod
    def _size(ctx: Ctx) -> int:
        first = ctx.first()
        shape = ctx.shape(first) if first else None
        dim = ctx.arg(2, "dim", 1)
        if not shape or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
            return 1
        return int(shape[dim])

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        return 0.0, 1.0 / _L2Normalize._size(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = _pass_forward(ctx)
        first = ctx.first()
        n = _L2Normalize._size(ctx)
        return {first: 1.0 / (n * max(xm[1], EPS)) if xm else 1.0} if first else {}


#: Keys the estimator models; anything else is "unknown" (gain 1, not understood).
def understands(key: str) -> bool:
    if key.startswith("activation:"):
        return True
    return key in FORWARD


# ---------------------------------------------------------------------------
# The sweeps


class _Estimator:
    def __init__(self, traced: TracedModel, inputs: tuple[Any, ...]) -> None:
        self.traced = traced
        self.graph: nx.DiGraph = traced.graph
        self.inputs = inputs
        self.moments: dict[str, Mom | None] = {}
        #: Variance of the per-unit (per-channel) means across units: the part of
        #: a node's variance that BatchNorm removes and that shifts activations.
        self.spread: dict[str, float] = {}
        self.pending_spread: float | None = None
        #: Recurrent unrolls by node (gradscope.estimate.recurrent.RecurrentEstimate).
        self.recurrent: dict[str, Any] = {}

    def tensor_of(self, node: str) -> torch.Tensor | None:
        return self.traced.tensors.get(node)

    def _needs_grad(self, order: list[str]) -> dict[str, bool]:
        """Which nodes carry a gradient: downstream of a trainable weight or a float input."""
        needs: dict[str, bool] = {}
        for name in order:
            data = node_record(self.graph, name)
            if not data.is_float:
                needs[name] = False
            elif data.role == "input":
                needs[name] = True
            elif data.role == "param":
                tensor = self.tensor_of(name)
                needs[name] = bool(tensor is not None and tensor.requires_grad)
            elif data.key in _no_grad_keys():
                needs[name] = False
            elif data.kind == "call_module" and self._trains(data):
                needs[name] = True  # its weights are not graph nodes (nn.Embedding on ids)
            else:
                needs[name] = any(needs.get(p, False) for p in self.graph.predecessors(name))
        return needs

    def _trains(self, data: dict[str, Any]) -> bool:
        module = self.traced.modules.get(data.module or "")
        return module is not None and any(p.requires_grad for p in module.parameters())

    def run(self) -> StaticEstimate:
        order = self.traced.order()
        est = StaticEstimate()
        input_index = 0
        for name in order:
            data = node_record(self.graph, name)
            role = data.role
            if not data.is_float:
                self.moments[name] = None
                if role == "input":
                    input_index += 1
                continue
            if role == "input":
                value = self.inputs[input_index] if input_index < len(self.inputs) else None
                input_index += 1
                self.spread[name] = _unit_means_spread(value) \
                    if isinstance(value, torch.Tensor) else 0.0
                self.moments[name] = tensor_stats(value) if isinstance(value, torch.Tensor) \
                    else (0.0, 1.0)
                continue
            if role == "param":
                tensor = self.tensor_of(name)
                self.moments[name] = tensor_stats(tensor) if tensor is not None else None
                continue
            key = data.key
            ctx = Ctx(self, name)
            known = understands(key)
            est.understood[name] = known
            fwd = FORWARD.get(key, _Activation.forward if key.startswith("activation:")
                              else _pass_forward)
            self.pending_spread = None
            try:
                mom = fwd(ctx)
            except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
                mom, est.understood[name] = _pass_forward(ctx), False
            self.moments[name] = _finite_moments(mom)
            self.spread[name] = _spread_of(ctx, self.moments[name], self.pending_spread)
        est.moments = dict(self.moments)
        needs_grad = self._needs_grad(order)

        out = self.traced.output_node
        ancestors = nx.ancestors(self.graph, out) | {out}
        sq: dict[str, float] = {n: 0.0 for n in order}
        structural: dict[str, float] = {n: 0.0 for n in order}
        sq[out] = 1.0
        structural[out] = 1.0
        for name in reversed(order):
            if name not in ancestors or node_record(self.graph, name).role != "compute" \
                    or not needs_grad[name]:
                continue
            data = node_record(self.graph, name)
            key = data.key
            ctx = Ctx(self, name)
            bwd = BACKWARD.get(key, _Activation.backward if key.startswith("activation:")
                               else _pass_backward)
            try:
                gains = bwd(ctx)
            except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
                gains = _pass_backward(ctx)
            structural_gains = _structural_gains(ctx, gains)
            for src, gain in gains.items():
                if not needs_grad.get(src) or node_record(self.graph, src).role == "param":
                    continue
                sq[src] += sq[name] * _finite(gain)
                structural[src] = max(structural[src],
                                      structural[name] * structural_gains.get(src, 1.0))
        est.sq_norm = sq
        est.recurrent = dict(self.recurrent)
        est.structural = structural

        out_numel = numel(node_record(self.graph, out).shape) or 1
        for name in order:
            data = node_record(self.graph, name)
            if data.role == "param" or not needs_grad[name] or name not in ancestors:
                est.grad_rms[name] = None
                est.health[name] = None
                continue
            n = numel(data.shape) or out_numel
            est.grad_rms[name] = math.sqrt(sq[name] * out_numel / n)
            est.health[name] = math.sqrt(sq[name] / structural[name]) \
                if structural[name] > 0 else None
        float_compute = [n for n in order if node_record(self.graph, n).role == "compute"
                         and node_record(self.graph, n).is_float]
        known_count = sum(1 for n in float_compute if est.understood.get(n, False))
        est.coverage = known_count / len(float_compute) if float_compute else 1.0
        est.unknown_ops = sorted({node_record(self.graph, n).op for n in float_compute
                                  if not est.understood.get(n, False)})
        return est


def _unit_means_spread(t: torch.Tensor) -> float:
    """Variance across units (dim 1, else the last dim) of each unit's mean over the rest."""
    if t.is_meta or t.dim() < 2 or not t.is_floating_point():
        return 0.0
    with torch.no_grad():
        x = t.detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        means = x.mean(dim=dims)
        return float(means.var(unbiased=False)) if means.numel() > 1 else 0.0


def _spread_of(ctx: Ctx, mom: Mom | None, pending: float | None) -> float:
    """The spread of unit means of a node's output (see ``_Estimator.spread``)."""
    if mom is None:
        return 0.0
    key = ctx.data.key
    first = ctx.first()
    spread_in = ctx.est.spread.get(first, 0.0) if first else 0.0
    if pending is not None:
        value = pending
    elif key in ("linear", "conv", "addmm", "conv_transpose"):
        # unit c's mean is sum_j W_cj mu_j + b_c: it varies with the weights even when
        # every input unit has the same mean.
        xm = ctx.est.moments.get(first) if first else None
        if xm is None:
            return 0.0
        w = ctx.weight("mat2", 2) if key == "addmm" else ctx.weight("weight", 1)
        b = ctx.weight("input", 0) if key == "addmm" else ctx.weight("bias", 2)
        if w is None:
            return 0.0
        fan = float(w.shape[0]) if key == "addmm" else float(w[0].numel())
        _, w2 = _wstats(w, (0.0, 1.0 / (3.0 * fan)))
        _, b2 = _wstats(b, (0.0, 0.0)) if b is not None else (0.0, 0.0)
        unit_mean_sq = fan * w2 * (xm[0] ** 2 + spread_in) + b2
        value = unit_mean_sq - mom[0] ** 2
    elif key in ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"):
        beta = ctx.param_by_suffix("bias")
        value = var_of(_wstats(beta, (0.0, 0.0))) if key == "batch_norm" else 0.0
    elif key in ("add", "sub", "rsub"):
        value = sum(ctx.est.spread.get(r, 0.0) for r in ctx.activations_in())
    elif key in ("view", "getitem", "max_pool", "avg_pool", "mean", "dropout", "neg", "cat",
                 "split") or key == "input":
        value = spread_in
    else:
        value = 0.0
    return min(max(value, 0.0), var_of(mom))


def _no_grad_keys() -> frozenset[str]:
    return frozenset({"detach", "constant"})


def _structural_gains(ctx: Ctx, gains: dict[str, float]) -> dict[str, float]:
    """The part of each gain that averaging ops impose by design (see module docstring)."""
    key = ctx.data.key
    if key in ("avg_pool", "mean"):
        return dict(gains)
    if key == "sum":
        return dict(gains)
    if key == "cat":
        return dict(gains)
    return {}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e300


def _finite_moments(m: Mom | None) -> Mom | None:
    if m is None:
        return None
    mean, second = m
    if not (math.isfinite(mean) and math.isfinite(second)):
        return None
    return mean, max(second, 0.0)


def estimate(traced: TracedModel, inputs: tuple[Any, ...],
             declared: dict[int, Mom] | None = None,
             overrides: dict[int, Mom] | None = None) -> StaticEstimate:
    """Run the forward and backward sweeps over ``traced``'s graph.

    ``inputs`` give the input moments (real tensors, even when the graph was
    traced on meta ones); ``declared`` maps ``id(tensor)`` of meta weights to
    their declared init moments; ``overrides`` replaces any weight's moments
    (by ``id``), for what-if estimates of a re-initialisation.
    """
    token = _DECLARED.set(declared or {})
    stats_token = _STATS.set({})
    override_token = _OVERRIDES.set(overrides or {})
    try:
        return _Estimator(traced, inputs).run()
    finally:
        _OVERRIDES.reset(override_token)
        _STATS.reset(stats_token)
        _DECLARED.reset(token)
