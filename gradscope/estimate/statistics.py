"""Moments of tensors: the numbers the static estimate starts from, and their cache.

Every op rule reads weights as a (mean, second moment) pair (:data:`Mom`), never
as values, so that a meta model (declared initialisations, ``gradscope.meta``)
and a what-if re-initialisation (``gradscope.fixes``) enter the estimate the
same way a real tensor does. Where those numbers come from is decided here, in
one place: an override for the tensor, else its declared init (meta tensors),
else a measurement, cached per estimate because several rules read the same
weight (measuring was the hot spot of the sweep on deep models).

The per-estimate state lives in context variables that :func:`statistics_scope`
sets, so concurrent estimates never see each other's declarations or overrides.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from gradscope.tracing.graph import WEIGHT_SOURCE

EPS = 1e-12

#: (mean, second moment) of a node's output; None where unknown or not floating.
Mom = tuple[float, float]
UNIT: Mom = (0.0, 1.0)


#: A key of the measurement cache (:func:`_cache_key`).
StatsKey = tuple[Hashable, ...]


def numel(shape: Sequence[int] | None) -> int | None:
    if shape is None:
        return None
    return math.prod(shape) if shape else 1


def var_of(m: Mom) -> float:
    return max(m[1] - m[0] * m[0], 0.0)


#: Declared init moments of meta tensors, by id, for the estimate being run
#: (see gradscope.meta); a context variable so concurrent estimates stay apart.
_DECLARED: contextvars.ContextVar[dict[int, Mom] | None] = contextvars.ContextVar(
    "declared", default=None)


#: Measured moments of weight tensors for the estimate being run: each weight is
#: read by several rules (forward, backward, spread), and reading is the hot spot.
#: Each entry keeps its tensor: a rule's temporary (``in_proj_weight.chunk(3)``) is freed
#: after use and a later temporary may get its id, which then read the stale moments (a
#: nondeterministic estimate of nn.MultiheadAttention's layers, 1e-4 relative).
#: Keys: :func:`_cache_key`.
_STATS: contextvars.ContextVar[dict[StatsKey, tuple[torch.Tensor, Mom]] | None] = \
    contextvars.ContextVar("stats", default=None)


#: Moments that replace a weight's own for the estimate being run, by id: how a
#: recommended re-initialisation is tried on a copy without touching the model
#: (gradscope.fixes).
_OVERRIDES: contextvars.ContextVar[dict[int, Mom] | None] = contextvars.ContextVar(
    "overrides", default=None)


@contextlib.contextmanager
def statistics_scope(declared: dict[int, Mom] | None = None,
                     overrides: dict[int, Mom] | None = None,
                     cache: dict[StatsKey, tuple[torch.Tensor, Mom]] | None = None,
                     ) -> Iterator[None]:
    """One estimate's declared moments, overrides and measurement cache (``cache``: one
    kept across estimates of the same tensors; a fresh one otherwise)."""
    token = _DECLARED.set(declared or {})
    stats_token = _STATS.set(cache if cache is not None else {})
    override_token = _OVERRIDES.set(overrides or {})
    try:
        yield
    finally:
        _OVERRIDES.reset(override_token)
        _STATS.reset(stats_token)
        _DECLARED.reset(token)


def tensor_stats(t: torch.Tensor) -> Mom | None:
    """(mean, second moment) of a tensor: measured, or declared for meta tensors.

    None for meta tensors whose initialisation was not seen: callers then use
    the module's documented default.
    """
    overrides = _OVERRIDES.get()
    if overrides and id(t) in overrides:
        return overrides[id(t)]
    if t.is_meta:
        declared = _DECLARED.get() or {}
        # A weight's transpose, view or cast (recorded by the tracer) holds the same
        # values, so it has the declared moments of the weight it was made from.
        source = getattr(t, WEIGHT_SOURCE, None)
        return declared.get(id(t), declared.get(id(source)) if source is not None else None)
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return None
    cache = _STATS.get()
    if cache is not None:
        key, owner = _cache_key(t)
        hit = cache.get(key)
        if hit is None or hit[0] is not owner:  # the same object, not a reused id
            hit = cache[key] = (owner, _measure(t))
        return hit[1]
    return _measure(t)


def _cache_key(t: torch.Tensor) -> tuple[StatsKey, torch.Tensor]:
    """The measurement cache's key for ``t``, and the tensor its entry must keep alive.

    A tensor is keyed by its id and version. A view (``in_proj_weight.chunk(3)``, which
    nn.MultiheadAttention's rules take afresh on every call, so its id is new every time)
    is keyed by the tensor it views and where it reads it (offset, shape, strides, dtype,
    conjugate and negative bits): the same elements of the same tensor, whose version
    counter it shares, so an in-place change of either is a new key. The entry keeps the
    viewed tensor, so its id is never reused for another while the cache lives.
    """
    base = t._base
    if base is None:
        return (id(t), t._version), t
    return (("view", id(base), t._version, t.storage_offset(), tuple(t.shape), t.stride(),
             t.dtype, t.is_conj(), t.is_neg()), base)


def _measure(t: torch.Tensor) -> Mom:
    with torch.no_grad():
        x = t.detach().to(torch.float64)
        return float(x.mean()), float((x * x).mean())


#: Facts computed from tensor values alone, kept across estimates of one traced model
#: (``TracedModel.weight_facts``), by a tag and the ids and versions of the tensors read.
Facts = dict[tuple[Hashable, ...], tuple[tuple[torch.Tensor, ...], Any]]


def cached_fact(facts: Facts, tag: str, tensors: tuple[torch.Tensor, ...],
                compute: Callable[[], Any]) -> Any:
    """``compute()``, a fact about the values of ``tensors``, cached in ``facts``.

    Keyed by each tensor's id and version: an in-place change is a new key, and an entry
    is used only for the very tensors it holds (not another that reuses a freed id).
    """
    key = (tag, *((id(t), t._version) for t in tensors))
    hit = facts.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors, strict=True)):
        return hit[1]
    value = compute()
    facts[key] = (tensors, value)
    return value


def weight_stats(t: torch.Tensor | None, default: Mom) -> Mom:
    """:func:`tensor_stats` of a weight, or ``default`` (its module's documented init)."""
    if t is None:
        return default
    stats = tensor_stats(t)
    return stats if stats is not None else default


def unit_means_spread(t: torch.Tensor) -> float:
    """Variance across units (dim 1, else the last dim) of each unit's mean over the rest."""
    if t.is_meta or t.dim() < 2 or not t.is_floating_point():
        return 0.0
    with torch.no_grad():
        x = t.detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        means = x.mean(dim=dims)
        return float(means.var(unbiased=False)) if means.numel() > 1 else 0.0
