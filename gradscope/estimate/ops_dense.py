"""Op rules for weight layers: linear, ``addmm`` (Hugging Face Conv1D), convolutions, embeddings.

Each output unit sums ``fan_in`` weight-times-input products, so the forward
second moment and the backward S-gain both scale with ``fan_in * E[w^2]``
(``docs/static-estimate.md``), read off the actual weight tensors (or their
declared init on meta). Convolutions also count the kernel taps that fall on
zero padding: they read nothing and pass nothing back.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradscope.estimate.ops_base import Ctx, rule
from gradscope.estimate.statistics import Mom, numel, weight_stats
from gradscope.tracing.graph import Ref


def _dense(ctx: Ctx, w: torch.Tensor | None, fan_in: int, bias: torch.Tensor | None,
           x: str | None, default_var: float | None = None,
           valid: float = 1.0) -> tuple[Mom | None, float]:
    """Moments out and S-gain back of y = W x + b with ``fan_in`` weights per output unit.

    ``valid`` is the share of those weights that meet real inputs (convolution
    padding); it scales both directions.
    """
    if default_var is None:
        default_var = 1.0 / (3.0 * max(fan_in, 1))  # PyTorch's default (kaiming_uniform a=sqrt 5)
    wm, w2 = weight_stats(w, (0.0, default_var))
    bm, b2 = weight_stats(bias, (0.0, 0.0)) if bias is not None else (0.0, 0.0)
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


def _conv_tap_shares(ctx: Ctx, w: torch.Tensor | None) -> list[list[float]] | None:
    """Per spatial dim, per kernel tap: the share of output positions where it reads a real input.

    None when there is no zero padding to starve the border (or the geometry is unknown).
    """
    first = ctx.first()
    in_shape, out_shape = (ctx.shape(first) if first else None), ctx.shape()
    if w is None or in_shape is None or out_shape is None or w.dim() < 3:
        return None
    n = w.dim() - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    if ctx.module is not None:
        if getattr(ctx.module, "padding_mode", "zeros") != "zeros":
            return None
        stride = _tuple(ctx.module.stride, n, 1)
        dilation = _tuple(ctx.module.dilation, n, 1)
        padding_value = ctx.module.padding
    else:
        stride = _tuple(ctx.arg(3, "stride", 1), n, 1)
        padding_value = ctx.arg(4, "padding", 0)
        dilation = _tuple(ctx.arg(5, "dilation", 1), n, 1)
    if padding_value == "valid":
        return None
    if padding_value == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    else:
        padding = _tuple(padding_value, n, 0)
    shares: list[list[float]] = []
    for dim in range(n):
        size_in, size_out = int(in_shape[-n + dim]), int(out_shape[-n + dim])
        per_tap = []
        for tap in range(kernel[dim]):
            offset = tap * dilation[dim] - padding[dim]
            # output positions o with 0 <= o*stride + offset < size_in
            lo = max(0, -(offset // stride[dim]) if offset < 0 else 0)
            while lo * stride[dim] + offset < 0:
                lo += 1
            hi = min(size_out - 1, (size_in - 1 - offset) // stride[dim])
            per_tap.append(max(0, hi - lo + 1) / max(size_out, 1))
        shares.append(per_tap)
    return shares


def _conv_valid_fraction(ctx: Ctx, w: torch.Tensor | None) -> float:
    """Share of (output position, kernel tap) pairs that land on a real input, not padding.

    Zero padding starves the border: with 3x3 kernels on 16x16 maps, 8% of the
    taps read zeros, which compounds to a factor 5 in the gradient over 20 layers.
    The same share scales the forward fan-in and the backward fan-out.
    """
    shares = _conv_tap_shares(ctx, w)
    if shares is None:
        return 1.0
    return math.prod(sum(per_tap) / len(per_tap) for per_tap in shares)


def unit_mean_fan(ctx: Ctx, w: torch.Tensor) -> float:
    """How many weights carry the input units' means into one output unit's mean.

    The spread of unit means after y = W x + b is Var_c(sum_j W_cj mu_j) =
    fan * E[w^2] * E_j[mu_j^2] (plus the bias's). For a linear layer the fan is the
    fan-in. A convolution's channel mean averages over positions, where tap t reads a
    real input on a share f_t of them (zero padding elsewhere), so unit c's mean is
    sum_{j,t} W_cjt mu_j f_t and the fan is C_in * sum_t f_t^2 (the product over
    spatial dims), not C_in * k: with 3x3 kernels on 8x8 maps it is 0.85 of the
    fan-in * valid share that scales the variance, which is what keeps the channel
    means' share of a deep plain ReLU CNN's variance near 0.5 (measured 0.46-0.57)
    instead of letting it run to 1.
    """
    if ctx.data.key == "addmm":
        return float(w.shape[0])
    # w[0].numel() without indexing (a view per call): the same product of sizes
    fan = float(math.prod(w.shape[1:]) if w.dim() >= 1 and w.shape[0] > 0 else w[0].numel())
    if ctx.data.key != "conv":
        return fan
    shares = _conv_tap_shares(ctx, w)
    if shares is None:
        return fan
    return fan * math.prod(sum(f * f for f in per_tap) / len(per_tap) for per_tap in shares)


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
        _, w2 = weight_stats(w, (0.0, 1.0 / (3.0 * max(fan_fwd, 1.0))))
        # S_in / S_out = (n_in * fan_back * w2) / n_out = fan_fwd * w2
        return {first: fan_fwd * w2}


@rule("embedding")
class _Embedding:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        return weight_stats(_embedding_table(ctx), (0.0, 1.0))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {}  # integer indices carry no gradient


def _embedding_table(ctx: Ctx) -> torch.Tensor | None:
    """The table an embedding reads: the module's, else the floating argument.

    ``aten.embedding(weight, indices)`` puts the table first and ``F.embedding(input,
    weight)`` (symbolic_trace and the runtime recorder) second: read as the first argument
    there, the indices gave no table and the unit prior stood in (OPT's learned positions,
    0.02 std, predicted at 1: 1.3 decades off downstream).
    """
    if ctx.module is not None:
        return ctx.weight("weight")
    for index in (0, 1):
        w = ctx.weight("weight", index)
        if w is not None and (w.is_floating_point() or w.is_meta):
            return w
    return None
