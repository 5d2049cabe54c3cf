"""The spread of unit means (``SweepState.spread``) where an op's rule alone cannot see it.

Train-mode BatchNorm divides by the *within-channel* variance: the node's
variance less the spread of its channel means. Both are differences of
similar numbers, so the spread must be counted consistently with the second
moment the op's own rule gives. Two ops need more than their input's spread: a
padded convolution and a concatenation.

Zero padding: ``ops_dense.unit_mean_fan`` counts C_in * sum_tap f_tap^2 weights
for a convolution's channel-mean spread (the padding-shaded taps), the same
count this module's concatenation rule relies on.

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

from gradscope.estimate.ops_base import Ctx
from gradscope.estimate.statistics import numel


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
