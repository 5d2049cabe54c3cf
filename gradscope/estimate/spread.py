"""The spread of unit means (``SweepState.spread``) where an op's rule alone cannot see it.

Train-mode BatchNorm divides by the *within-channel* variance: the node's
variance less the spread of its channel means. Both are differences of
similar numbers, so the spread must be counted consistently with the second
moment the op's own rule gives. Two ops need more than their input's spread:

Zero padding (:func:`conv_mean_share`).

A convolution's output channel c has the mean, over the positions p of the map,

    mean_c = sum_{tap, j} W[c, j, tap] * f_tap * mu_j,

where f_tap is the share of output positions at which ``tap`` lands on a real
input (at the other positions it reads zero padding). Over channels, with
zero-mean weights of second moment w2, its variance (the *spread*
``SweepState.spread`` tracks) is

    Var_c(mean_c) = w2 * (c_in / groups) * E[mu_j^2] * sum_tap f_tap^2,

whereas the conv rule's output second moment counts ``sum_tap f_tap`` taps
(``ops_dense._conv_valid_fraction``). Without padding both sums are the number
of taps; with it, the spread is the smaller one. Counting every tap in the
spread but not in the second moment made the spread exceed the variance on
small maps (3x3 kernels on 8x8 maps: 16% of the taps read padding), and
BatchNorm, which divides by the *within-channel* variance (variance minus
spread), divided by its epsilon: a predicted gain 316x where the probe
measured 2.4x (``classic/cifar_cnn_bn``).

Concatenation along the channels (:func:`cat_spread`). Each part brings its
own channels, so the channel means of ``cat([a, b], 1)`` spread as much as each
part's do *and* as much as the parts' means differ: with shares ``s_k`` of the
channels, ``sum_k s_k (spread_k + m_k^2) - m^2``. Taking the first part's spread
alone missed the second term: DenseNet concatenates max-pooled ReLU outputs
(mean 1.3) with conv outputs (mean 0), and its BatchNorm then divided by a
variance that still held the difference of the parts' means (0.70 where the
batch variance was 0.47).
"""

from __future__ import annotations

from typing import Any

import torch

from gradscope.estimate.ops_base import Ctx
from gradscope.estimate.statistics import numel


def _ints(value: Any, n: int, default: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        if len(value) == n:
            return tuple(value)
        if len(value) == 1:
            return (value[0],) * n
    return (default,) * n


def _geometry(ctx: Ctx, kernel: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...],
                                                           tuple[int, ...]] | None:
    """(stride, dilation, padding) of a zero-padded convolution, or None (no zero padding)."""
    n = len(kernel)
    if ctx.module is not None:
        if getattr(ctx.module, "padding_mode", "zeros") != "zeros":
            return None
        stride = _ints(getattr(ctx.module, "stride", 1), n, 1)
        dilation = _ints(getattr(ctx.module, "dilation", 1), n, 1)
        padding_value = getattr(ctx.module, "padding", 0)
    else:
        if ctx.data.op in ("convolution", "_convolution") and bool(ctx.arg(6, "transposed")):
            return None
        stride = _ints(ctx.arg(3, "stride", 1), n, 1)
        padding_value = ctx.arg(4, "padding", 0)
        dilation = _ints(ctx.arg(5, "dilation", 1), n, 1)
    if padding_value == "valid":
        return None
    if padding_value == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    else:
        padding = _ints(padding_value, n, 0)
    return stride, dilation, padding


def tap_shares(size_in: int, size_out: int, kernel: int, stride: int, dilation: int,
               padding: int) -> list[float]:
    """Per tap of one spatial dimension: the share of output positions where it reads input."""
    shares = []
    for tap in range(kernel):
        offset = tap * dilation - padding
        hits = sum(1 for o in range(size_out) if 0 <= o * stride + offset < size_in)
        shares.append(hits / max(size_out, 1))
    return shares


def conv_mean_share(ctx: Ctx, w: torch.Tensor | None) -> float:
    """``sum_tap f_tap^2 / n_taps``: the factor zero padding puts on the channel-mean spread.

    1 without padding (every tap always reads input); the product over spatial
    dimensions, since a tap's share is the product of its per-dimension shares.
    """
    first = ctx.first()
    in_shape, out_shape = (ctx.shape(first) if first else None), ctx.shape()
    if w is None or in_shape is None or out_shape is None or w.dim() < 3:
        return 1.0
    kernel = tuple(int(k) for k in w.shape[2:])
    n = len(kernel)
    if len(in_shape) < n or len(out_shape) < n:
        return 1.0
    geometry = _geometry(ctx, kernel)
    if geometry is None:
        return 1.0
    stride, dilation, padding = geometry
    share = 1.0
    for dim in range(n):
        taps = tap_shares(int(in_shape[-n + dim]), int(out_shape[-n + dim]), kernel[dim],
                          stride[dim], dilation[dim], padding[dim])
        share *= sum(f * f for f in taps) / max(kernel[dim], 1)
    return share


def _cat_dim(ctx: Ctx) -> int | None:
    dim = ctx.arg(1, "dim", 0)
    shape = ctx.shape()
    if not isinstance(dim, int) or not shape:
        return None
    return dim + len(shape) if dim < 0 else dim


def cat_spread(ctx: Ctx) -> float:
    """Spread of unit means of a concatenation, from its parts' moments and spreads.

    Along dim 1 (the unit dimension, as in ``statistics.unit_means_spread``), the
    parts' units are side by side: ``sum_k s_k (spread_k + m_k^2) - m^2``. Along
    another dimension each unit's mean is a mix of the parts' means of that unit,
    taken here as the share-weighted spread of the parts.
    """
    refs = ctx.activations_in()
    sizes = {r: numel(ctx.shape(r)) or 0 for r in refs}
    total = sum(sizes.values())
    if not refs or total <= 0:
        return 0.0
    parts = []
    for r in refs:
        mom = ctx.est.moments.get(r)
        if mom is None:
            return ctx.est.spread.get(refs[0], 0.0)
        parts.append((sizes[r] / total, mom[0], ctx.est.spread.get(r, 0.0)))
    if ctx.data.op not in ("cat", "concat", "concatenate") or _cat_dim(ctx) != 1:
        return sum(share * spread for share, _, spread in parts)
    mean = sum(share * m for share, m, _ in parts)
    return sum(share * (spread + m * m) for share, m, spread in parts) - mean * mean
