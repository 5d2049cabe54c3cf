"""Op rules for softmax and attention: ``softmax``, ``log_softmax``,
``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``.

Per softmax row, A = E[sum p^2] (how concentrated the row is) and B, the
squared norm of the softmax Jacobian applied to a random direction, for
Gaussian logits of the predicted variance; the value path's gain is A, the
query and key paths' gains go through B (``docs/static-estimate.md``).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch

from gradscope.estimate.ops_base import Ctx, pass_backward, pass_forward, rule
from gradscope.estimate.statistics import UNIT, Mom, var_of, weight_stats
from gradscope.tracing.graph import Ref, node_record


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


def softmax_terms(n: int, var: float, causal: bool = False,
                  rows: tuple[int, ...] | None = None) -> tuple[float, float]:
    """Row terms (A, B), averaged over the rows of a causal mask (row i sees i+1 keys),
    or over ``rows``, the number of keys each query row sees under an explicit mask."""
    var = round(min(max(var, 0.0), 50.0), 3)
    if rows:
        return _masked_terms(rows, var)
    if not causal or n <= 1:
        return _softmax_row_terms(max(n, 1), var)
    sizes = sorted({max(1, round(x)) for x in
                    [1 + (n - 1) * k / 47 for k in range(48)]}) if n > 48 else range(1, n + 1)
    terms = [_softmax_row_terms(size, var) for size in sizes]
    return (sum(a for a, _ in terms) / len(terms), sum(b for _, b in terms) / len(terms))


def _masked_terms(rows: tuple[int, ...], var: float) -> tuple[float, float]:
    """(A, B) averaged over query rows that see ``rows[i]`` keys each."""
    kept = sorted(set(rows))
    if len(kept) > 48:
        kept = sorted({kept[round(k * (len(kept) - 1) / 47)] for k in range(48)})
    # a row of a size not kept (over 48 distinct sizes) counts with the nearest kept one
    weights = dict.fromkeys(kept, 0)
    for r in rows:
        weights[min(kept, key=lambda s: abs(s - r))] += 1
    total = sum(weights.values())
    row_terms = {size: _softmax_row_terms(size, var) for size in kept}
    return (sum(weights[s] * row_terms[s][0] for s in kept) / total,
            sum(weights[s] * row_terms[s][1] for s in kept) / total)


@rule("softmax")
class _Softmax:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        t = _softmax_size(ctx)
        a, _ = softmax_terms(t, var_of(xm) if xm else 0.0)
        return 1.0 / t, a / t

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = pass_forward(ctx)
        t = _softmax_size(ctx)
        _, b = softmax_terms(t, var_of(xm) if xm else 0.0)
        # dx = p * (dy - <p, dy>): per row E||dx||^2 = B E[dy^2], over t elements
        return {r: b / t for r in ctx.activations_in()[:1]}


@rule("log_softmax")
class _LogSoftmax:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        t = _softmax_size(ctx)
        return -math.log(t), math.log(t) ** 2 + (var_of(xm) if xm else 0.0)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {r: 1.0 for r in ctx.activations_in()[:1]}


def _attention(t: int, d: int, scale: float | None, qm: Mom, km: Mom, vm: Mom,
               causal: bool, rows: tuple[int, ...] | None = None
               ) -> tuple[Mom, float, float, float]:
    """Output moments and S-gains to (q, k, v) of softmax(q k^T * scale) v.

    Value path: each value row is averaged with weights p, so S_v = A. Query and
    key paths: the softmax Jacobian (B) times the logits' sensitivity
    scale^2 d E[k^2] E[v^2] (resp. E[q^2]). Causal rows see 1..T keys; the
    first sees one and passes no gradient to q or k at all.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(max(d, 1))
    logit_var = scale * scale * d * qm[1] * km[1]
    a, b = softmax_terms(max(t, 1), logit_var, causal, rows)
    out = (vm[0], vm[0] ** 2 + var_of(vm) * a)
    s_qk = scale * scale * d * vm[1] * b
    return out, s_qk * km[1], s_qk * qm[1], a


def _core_structural(names: Any, gains: Any) -> dict[str, float]:
    """Structural gains of the attention core to (query, key, value): a tensor used as
    several of them keeps its largest path, as the structural sweep does across paths.
    Capped at 1: a structural gain says how much a path *shrinks* by design; a query or
    key path that amplifies (large activations) is the estimate's to judge."""
    out: dict[str, float] = {}
    for name, gain in zip(names, gains, strict=True):
        out[name] = max(out.get(name, 0.0), min(float(gain), 1.0))
    return out


#: Keys seen per query row, by mask node, per sweep (evaluated once per estimate).
_MASK_ROWS: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...] | None]] = \
    weakref.WeakKeyDictionary()
#: Most nodes a mask's constant subgraph may have for :func:`visible_keys` to evaluate it.
_MASK_NODES = 64


def visible_keys(ctx: Ctx, mask: str) -> tuple[int, ...] | None:
    """How many keys each query row sees under an ``attn_mask`` built from constants.

    Decoders often pass causality as a mask tensor (``arange(T)[None] <= arange(T)[:,
    None]``, expanded) instead of ``is_causal``: read as "no mask", every row would
    average over all T keys, so the value path's gain A = E[sum p^2] came out ~1/T
    instead of the causal mean of 1/(i+1) (3.4x too small at T = 16) and the query/key
    paths likewise. The mask depends on shapes only, so its subgraph (aten calls on
    constants, no inputs or weights) is evaluated here, once per mask node; a mask
    that depends on the inputs or on weights, or that uses an op not resolvable as
    ``torch.ops.aten``, gives None (no mask assumed, as before). A boolean mask keeps
    the True keys; a float (additive) mask the keys above -1e4.
    """
    cache = _MASK_ROWS.setdefault(ctx.est, {})
    if mask not in cache:
        cache[mask] = _evaluate_rows(ctx, mask)
    return cache[mask]


def _evaluate_rows(ctx: Ctx, mask: str) -> tuple[int, ...] | None:
    import networkx as nx  # the graph library the tracers already use

    graph = ctx.est.graph
    needed = nx.ancestors(graph, mask) | {mask}
    if len(needed) > _MASK_NODES:
        return None
    values: dict[str, Any] = {}

    def resolve(value: Any) -> Any:
        if isinstance(value, Ref):
            return values[value.name]
        if isinstance(value, torch.device):  # a meta-built model's masks: on the CPU
            return torch.device("cpu")
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v) for v in value)
        return value

    for name in ctx.est.traced.order():
        if name not in needed:
            continue
        data = node_record(graph, name)
        if data.role != "compute" or data.kind != "call_function" \
                or not str(data.target).startswith("aten."):
            return None
        parts = str(data.target).split(".")
        try:
            fn = getattr(getattr(torch.ops.aten, parts[1]), parts[2] if len(parts) > 2
                         else "default")
            with torch.no_grad():
                values[name] = fn(*resolve(data.args), **resolve(data.kwargs))
        except (AttributeError, RuntimeError, TypeError, ValueError, KeyError, IndexError):
            return None
    m = values.get(mask)
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or m.is_meta:
        return None
    try:
        seen = m if m.dtype == torch.bool else m > -1e4
        counts = seen.reshape(-1, seen.shape[-2], seen.shape[-1]).sum(-1).double().mean(0)
        return tuple(max(round(float(c)), 1) for c in counts)
    except (RuntimeError, ValueError):
        return None


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
        mask = ctx.arg(3, "attn_mask")
        rows = visible_keys(ctx, mask.name) if isinstance(mask, Ref) and not causal else None
        out, sq, sk, sv = _attention(int(kshape[-2]) if len(kshape) > 1 else 1,
                                     int(qshape[-1]), scale if isinstance(scale, float) else None,
                                     moms[0], moms[1], moms[2], causal,  # type: ignore[arg-type]
                                     rows)
        return out, sq, sk, sv, names

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        parts = _SDPA._parts(ctx)
        return parts[0] if parts else pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        parts = _SDPA._parts(ctx)
        if not parts:
            return pass_backward(ctx)
        _, sq, sk, sv, names = parts
        gains: dict[str, float] = {}
        for name, gain in zip(names, (sq, sk, sv), strict=True):
            gains[name] = gains.get(name, 0.0) + gain
        return gains

    @staticmethod
    def structural(ctx: Ctx) -> dict[str, float]:
        """Every gain of the attention core is by design (it has no weights).

        Each output row is a weighted mean of the value rows; at initialisation the
        softmax is near uniform, so the value path (A = E[sum p^2]) is a mean over the
        keys and shrinks the gradient's squared norm the way average pooling does (by
        1/T over T keys) without starving any weight; the query and key paths are weak
        because the softmax is flat, the reason they are not entry layers. Where
        attention is the only way back (an encoder read only through cross-attention,
        as in Whisper, T5 and BART) that shrink is not decay; where a residual path
        runs beside it, the structural sweep's maximum over paths keeps 1.
        """
        parts = _SDPA._parts(ctx)
        return _core_structural(parts[4], parts[1:4]) if parts else {}


@rule("mha")
class _MHA:
    """nn.MultiheadAttention: in-projections, scaled dot-product attention, out-projection."""

    @staticmethod
    def _parts(ctx: Ctx) -> tuple[Mom, dict[str, float], dict[str, float]] | None:
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
            _, w2 = weight_stats(w, (0.0, 1.0 / (2.0 * fan)))  # xavier_uniform_ default
            w2s.append(w2)
            proj.append((0.0, fan * w2 * mom[1]))  # type: ignore[index]
        kshape = ctx.shape(names[1]) or [1, 1, 1]
        t = int(kshape[1] if m.batch_first else kshape[0]) if len(kshape) == 3 else \
            int(kshape[0])
        d = e // m.num_heads
        out, sq, sk, sv = _attention(t, d, None, proj[0], proj[1], proj[2], False)
        _, wo2 = weight_stats(m.out_proj.weight, (0.0, 1.0 / (3.0 * e)))
        bm, b2 = weight_stats(m.out_proj.bias, (0.0, 0.0))
        q_out = e * wo2 * out[1] + b2
        s_attn = e * wo2
        gains: dict[str, float] = {}
        for name, fan, w2, s in zip(names, fans, w2s, (sq, sk, sv), strict=True):
            gains[name] = gains.get(name, 0.0) + s_attn * s * fan * w2 * e / max(fan, 1)
        return (bm, q_out), gains, _core_structural(names, (sq, sk, sv))

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        parts = _MHA._parts(ctx)
        return parts[0] if parts else pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        parts = _MHA._parts(ctx)
        return parts[1] if parts else pass_backward(ctx)

    @staticmethod
    def structural(ctx: Ctx) -> dict[str, float]:
        """The attention core's gains, as for ``_SDPA.structural`` (the projections
        around it are weights: their gains are not by design)."""
        parts = _MHA._parts(ctx)
        return parts[2] if parts else {}
