"""Op rules for softmax and attention: ``softmax``, ``log_softmax``,
``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``.

Per softmax row, A = E[sum p^2] (how concentrated the row is) and B, the
squared norm of the softmax Jacobian applied to a random direction, for
Gaussian logits of the predicted variance; the value path's gain is A, the
query and key paths' gains go through B (``docs/static-estimate.md``).
The value path's gain A holds for a gradient independent from row to row; the
part of the gradient that is the same at every query row (a mean-pooled
readout, ``gradscope.estimate.coherence``) passes with the column-sum gain of
:func:`coherent_value_gain` instead, ~1 rather than ~1/T.
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


def _row_sizes(tq: int, tk: int, causal: bool, rows: tuple[int, ...] | None) -> tuple[int, ...]:
    """Keys each query row sees: all, a causal prefix (top-left aligned, as SDPA), or ``rows``."""
    if rows and len(rows) == tq:
        return tuple(min(max(int(n), 1), tk) for n in rows)
    if causal:
        return tuple(min(i + 1, tk) for i in range(tq))
    return (tk,) * tq


@functools.lru_cache(maxsize=1024)
def _column_sum_squares(sizes: tuple[int, ...], tk: int) -> tuple[float, float]:
    """(sum_j E[s_j]^2, sum_i 1/n_i) for column sums s_j = sum_i p_ij of rows over prefixes.

    Row i spreads weight 1 over its first n_i keys, E[p_ij] = 1/n_i, so E[s_j] =
    sum_{i: n_i > j} 1/n_i (a key seen by the visible rows collects each row's mean weight).
    """
    n = torch.tensor(sizes, dtype=torch.float64)
    inv = 1.0 / n
    if len(set(sizes)) == 1:  # every row sees the same n keys: E[s_j] = T_q / n on them
        return len(sizes) ** 2 / sizes[0], float(inv.sum())
    seen = torch.arange(tk, dtype=torch.float64)[None, :] < n[:, None]
    mean_col = (seen * inv[:, None]).sum(0)
    return float((mean_col * mean_col).sum()), float(inv.sum())


def coherent_value_gain(tq: int, tk: int, a: float, causal: bool = False,
                        rows: tuple[int, ...] | None = None) -> tuple[float, float]:
    """(C, K): value-path gains of a gradient that is the same vector g at every query row.

    dV_j = sum_i p_ij g = s_j g, so ||dV||^2 = sum_j s_j^2 ||g||^2 against ||G||^2 =
    T_q ||g||^2 at the output: C = sum_j E[s_j^2] / T_q. Rows are independent, so
    E[s_j^2] = E[s_j]^2 + sum_i Var(p_ij), and summed over j a row contributes
    sum_j Var(p_ij) = A_i - 1/n_i (A_i = E[sum_j p_ij^2] over its n_i keys):

        C = (sum_j E[s_j]^2 + T_q A - sum_i 1/n_i) / T_q,

    with A the rows' mean (``softmax_terms``). Without a mask E[s_j] = T_q/T_k and
    C = T_q/T_k + A - 1/T_k: ~1 for self-attention, where independent rows give A
    ~ 1/T. Causal rows concentrate on the first keys (E[s_j] = H_T - H_j, sum_j ~ 2T).
    K is the part of that squared norm that is again the same at every key (the
    mean over keys of s_j is T_q/T_k): K = (T_q^2 / T_k) / sum_j E[s_j^2] of C T_q.
    """
    sizes = _row_sizes(tq, tk, causal, rows)
    if len(set(sizes)) == 1 and sizes[0] == tk:
        mean_sq, inv_sum = tq * tq / tk, tq / tk
    else:
        mean_sq, inv_sum = _column_sum_squares(sizes, tk)
    total = max(mean_sq + tq * a - inv_sum, mean_sq, 1e-30)
    return total / tq, min((tq * tq / tk) / total, 1.0)


def attention_coherence(c: float, tq: int, tk: int, a: float, causal: bool,
                        rows: tuple[int, ...] | None) -> tuple[float, float, float]:
    """(S_v gain, coherent share of dV along keys, coherent share of dQ along queries).

    The output gradient is G = 1 g^T + R with a share ``c`` of its squared norm in
    the common part. Value path: the common part passes with C
    (:func:`coherent_value_gain`), the rest with A; of the result, the common part
    gives c K C along the keys, and R gives its row mean, (1/T_k) sum_i R_i
    broadcast over keys (each row of P sums to 1): (1 - c) / T_k. The share is
    counted in excess of chance: independent rows' mean holds 1/T of their
    energy, and that part is already in A (G's "R" includes it), so c is the
    share beyond it, (share - 1/T) / (1 - 1/T). For causal rows over T = 8 this
    gives a measured 0.37 of dV in the mean over keys (0.28 in excess of 1/8);
    for near-uniform rows, 1: the value gradient is one vector at every key
    whatever the output gradient was (cross-attention into an encoder). Query path: dq_i
    = J_i^T (V g) depends on row i only through its softmax row, so its squared
    norm is that of independent rows (gain B unchanged); for near-uniform rows
    every J_i is the same and dq keeps the share c, for sharp rows the rows
    differ, scaled here by 1 / (T_k A), the rows' uniformity (1 when uniform).
    """
    big_c, k = coherent_value_gain(tq, tk, a, causal, rows)
    gain = c * big_c + (1.0 - c) * a
    if gain <= 0.0:
        return a, 0.0, 0.0
    coherent = c * k * big_c + (1.0 - c) / max(tk, 1)
    # the mean over T_k independent rows holds 1/T_k of their energy by chance: the share
    # carried is the excess over that, c = (share - 1/T_k) / (1 - 1/T_k), as for the input
    chance = 1.0 / max(tk, 1)
    share_v = (min(coherent / gain, 1.0) - chance) / (1.0 - chance) if tk > 1 else 0.0
    return gain, max(share_v, 0.0), c * min(1.0 / max(tk * a, 1e-30), 1.0)


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
               causal: bool, rows: tuple[int, ...] | None = None, shared_width: int = 0,
               common: float = 0.0) -> tuple[Mom, float, float, float]:
    """Output moments and S-gains to (q, k, v) of softmax(q k^T * scale) v.

    Value path: each value row is averaged with weights p, so S_v = A. Query and
    key paths: the softmax Jacobian (B) times the logits' sensitivity
    scale^2 d E[k^2] E[v^2] (resp. E[q^2]). Causal rows see 1..T keys; the
    first sees one and passes no gradient to q or k at all.

    That treats g.v_j and k_j as independent. When keys and values are two
    projections of the same input x (``shared_width``, its width D; any
    self-attention, and cross-attention's keys and values of one memory), they
    are correlated at each key through x_j: dq_i = scale * Cov_p(g.v_j, k_j)
    over the row's keys = scale W_k C W_v^T g, with C the p-weighted covariance
    of x over positions, E[C] = (1 - sum_j p_j^2) Sigma. The B term is that
    covariance's sampling noise; its mean adds a part that does not average
    away over keys: E||W_k Sigma W_v^T g||^2 = d w_k^2 w_v^2 |g|^2 tr(Sigma^2),
    which for positions of width D (tr(Sigma^2) = D sigma^4) is, with E[k^2] =
    D w_k^2 sigma^2 and likewise v, scale^2 d Var[k] Var[v] (1 - A) / D: 1/(D B)
    ~ T/D times the B term. On a Pre-LN encoder with T = 24, D = 32 the query
    projection was 0.34 decade low in squared norm without it.

    ``common``: the share of the values' variance that is the same at every key
    (``gradscope.estimate.collapse``); it passes whole, only the rest is averaged
    down to A: the output's variance is Var[v] (common + (1 - common) A).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(max(d, 1))
    logit_var = scale * scale * d * qm[1] * km[1]
    a, b = softmax_terms(max(t, 1), logit_var, causal, rows)
    mixed = common + (1.0 - common) * a if common > 0.0 else a
    out = (vm[0], vm[0] ** 2 + var_of(vm) * mixed)
    s_qk = scale * scale * d * vm[1] * b
    s_q = s_qk * km[1]
    if shared_width:
        s_q += scale * scale * d * var_of(vm) * var_of(km) * (1.0 - a) / shared_width
    return out, s_q, s_qk * qm[1], a


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
    constants, no inputs or weights) is evaluated here, once per mask node (the runtime
    recorder folds such a subgraph into one constant, read as it is); a mask
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
    if node_record(graph, mask).role == "param":
        # A constant with its value (the runtime recorder folds what is computed from
        # constants alone): nothing to evaluate.
        return _rows_of(ctx.est.tensor_of(mask))
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
    return _rows_of(values.get(mask))


def _rows_of(m: Any) -> tuple[int, ...] | None:
    """Keys each query row of a mask tensor sees (True, or above -1e4 when additive)."""
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or m.is_meta:
        return None
    try:
        seen = m if m.dtype == torch.bool else m > -1e4
        counts = seen.reshape(-1, seen.shape[-2], seen.shape[-1]).sum(-1).double().mean(0)
        return tuple(max(round(float(c)), 1) for c in counts)
    except (RuntimeError, ValueError):
        return None


def _projected_from(ctx: Ctx, name: str) -> tuple[str, str] | None:
    """(projection node, its input): the one ``linear`` behind ``name`` through views."""
    graph = ctx.est.graph
    seen = 0
    while seen < 32:
        seen += 1
        data = node_record(graph, name)
        ins = [r for r in data.inputs if node_record(graph, r).is_float
               and node_record(graph, r).role != "param"]
        if data.key in ("linear", "addmm"):
            return (name, ins[0]) if len(ins) == 1 else None
        if data.key != "view" or len(ins) != 1:
            return None
        name = ins[0]
    return None


def shared_input_width(ctx: Ctx, key: str, value: str) -> int:
    """Width of the input that keys and values are both projected from (0: not one input).

    Followed back through views (head splits, transposes, the ``select`` of a packed
    in-projection) to one ``linear`` each; the projections' weights differ (two
    linears, or two row blocks of one packed weight), the input is the same node.
    """
    k_src, v_src = _projected_from(ctx, key), _projected_from(ctx, value)
    if k_src is None or v_src is None or k_src[1] != v_src[1]:
        return 0
    if k_src[0] == v_src[0] and key == value:
        return 0
    shape = ctx.shape(k_src[1])
    return int(shape[-1]) if shape else 0


#: What one attention call's value-path gain depends on: (T_q, T_k, A, causal, rows).
Shape = tuple[int, int, float, bool, "tuple[int, ...] | None"]


def output_coherence(ctx: Ctx, axis: int) -> float:
    """The coherent share, along ``axis`` of this node's output, of the gradient arriving
    there (``gradscope.estimate.coherence``; 0 outside a backward sweep)."""
    coh = getattr(ctx.est, "grad_coherence", {}).get(ctx.name)
    shape = ctx.shape()
    return float(coh.along(shape, axis)) if coh is not None and shape else 0.0


def _value_common(ctx: Ctx, value: str) -> float:
    """The share of the values' variance common to every key (forward sweep only)."""
    coh = getattr(ctx.est, "token_share", {}).get(value)
    shape = ctx.shape(value)
    if coh is None or not shape or len(shape) < 2:
        return 0.0
    return float(coh.along(shape, len(shape) - 2))


def sdpa_value_share(ctx: Ctx) -> tuple[float, float] | None:
    """(value-path variance gain, token-mean share of the output) of an sdpa node.

    :func:`attention_token_share` with the value input's share
    along the keys and the rows' A; None where the node's arguments are not understood.
    """
    parts = _SDPA._parts(ctx)
    if not parts:
        return None
    tq, tk, a, _, _ = parts[5]
    names = parts[4]
    return attention_token_share(_value_common(ctx, names[2]), tq, tk, a)


def attention_token_share(c: float, tq: int, tk: int, a: float) -> tuple[float, float]:
    """(value-path variance gain, token-mean share of the output) for near-uniform rows.

    ``c``: the value rows' common share along the keys; ``a``: ``E[sum_j p_ij^2]``. The gain
    ``c + (1 - c) a`` replaces mean field's ``a``; the output's share is the excess over
    chance ``1 / T_q`` of ``(c + (1 - c) / T_k) / (c + (1 - c) a)`` (module docstring).
    """
    c = min(max(c, 0.0), 1.0)
    gain = c + (1.0 - c) * a
    if gain <= 0.0 or tq <= 1 or tk < 1:
        return a, 0.0
    raw = min((c + (1.0 - c) / tk) / gain, 1.0)
    chance = 1.0 / tq
    return gain, max((raw - chance) / (1.0 - chance), 0.0)


@rule("sdpa")
class _SDPA:
    @staticmethod
    def _parts(ctx: Ctx) -> tuple[Mom, float, float, float, list[str], Shape] | None:
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
        tk = int(kshape[-2]) if len(kshape) > 1 else 1
        tq = int(qshape[-2]) if len(qshape) > 1 else 1
        out, sq, sk, sv = _attention(tk, int(qshape[-1]),
                                     scale if isinstance(scale, float) else None,
                                     moms[0], moms[1], moms[2], causal,  # type: ignore[arg-type]
                                     rows, shared_input_width(ctx, names[1], names[2]),
                                     _value_common(ctx, names[2]))
        return out, sq, sk, sv, names, (tq, tk, sv, causal, rows)

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        parts = _SDPA._parts(ctx)
        return parts[0] if parts else pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        core = _SDPA._core_gains(ctx)
        if core is None:
            return pass_backward(ctx)
        gains: dict[str, float] = {}
        for name, gain in zip(*core, strict=True):
            gains[name] = gains.get(name, 0.0) + gain
        return gains

    @staticmethod
    def _core_gains(ctx: Ctx) -> tuple[list[str], tuple[float, float, float]] | None:
        """(q, k, v names, their gains), the value gain with the output's coherent share."""
        parts = _SDPA._parts(ctx)
        if not parts:
            return None
        _, sq, sk, sv, names, shape = parts
        out_shape = ctx.shape() or (1, 1)
        c = output_coherence(ctx, len(out_shape) - 2)
        if c > 0.0:
            sv = attention_coherence(c, *shape)[0]
        return names, (sq, sk, sv)

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
        core = _SDPA._core_gains(ctx)
        return _core_structural(*core) if core else {}


def sdpa_coherence(ctx: Ctx, coh: Any) -> dict[str, tuple[float, Any, int]]:
    """Coherence of the gradients SDPA passes to q and v, along their row axis (-2):
    (share, input shape, axis) by input, which ``gradscope.estimate.coherence`` turns
    into its records (this module does not import it: coherence calls here).

    Set even when the output's gradient has none: near-uniform rows average
    independent row gradients into one vector for every key (Whisper's
    cross-attention makes the encoder's gradient coherent this way).
    """
    parts = _SDPA._parts(ctx)
    out_shape = ctx.shape()
    if not parts or out_shape is None or len(out_shape) < 2:
        return {}
    _, sq, sk, _, names, shape = parts
    c = coh.along(out_shape, len(out_shape) - 2)
    sv, share_v, share_q = attention_coherence(c, *shape)
    # one tensor may be several of q, k, v: its coherent energy is the gains' weighted sum
    energy: dict[str, list[float]] = {}
    for name, gain, share in zip(names, (sq, sk, sv), (share_q, 0.0, share_v), strict=True):
        acc = energy.setdefault(name, [0.0, 0.0])
        acc[0] += gain * share
        acc[1] += gain
    got: dict[str, tuple[float, Any, int]] = {}
    for name, (coherent, total) in energy.items():
        in_shape = ctx.shape(name) or ()
        if coherent > 0.0 and total > 0.0 and len(in_shape) >= 2:
            got[name] = (min(coherent / total, 1.0), in_shape, len(in_shape) - 2)
    return got


@rule("mha")
class _MHA:
    """nn.MultiheadAttention: in-projections, scaled dot-product attention, out-projection.

    The value path's gain and the query path's shared-input term are those of
    :func:`_attention` and :func:`attention_coherence`, with the coherent share of
    the output's gradient along the sequence axis (dim 1 with ``batch_first``).
    """

    @staticmethod
    def _parts(ctx: Ctx, c: float = 0.0
               ) -> tuple[Mom, dict[str, float], dict[str, float], dict[str, float],
                          float] | None:
        """(output moments, gains, coherent shares, the core's structural gains, the
        output's token-mean share along the sequence axis).

        The values' share common to every position (``gradscope.estimate.collapse``)
        passes the core whole, as in :func:`_attention`; the out-projection keeps it
        with its bias and the image of the core's mean counted as common (as ``linear``).
        """
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
        qshape = ctx.shape(names[0]) or [1, 1, 1]
        t = int(kshape[1] if m.batch_first else kshape[0]) if len(kshape) == 3 else \
            int(kshape[0])
        tq = int(qshape[1] if m.batch_first else qshape[0]) if len(qshape) == 3 else \
            int(qshape[0])
        d = e // m.num_heads
        # keys and values projected from one input are correlated at each key (_attention)
        shared = int(kd) if names[1] == names[2] else 0
        vshape = ctx.shape(names[2])
        vcoh = getattr(ctx.est, "token_share", {}).get(names[2])
        vm = moms[2]
        cv = 0.0
        if vcoh is not None and vshape and vm is not None and vm[1] > 0.0:
            axis = _MHA._sequence_axis(ctx) if len(vshape) == 3 else 0
            cv = float(vcoh.along(vshape, axis)) * var_of(vm) / vm[1]
        out, sq, sk, a = _attention(t, d, None, proj[0], proj[1], proj[2], False, None, shared,
                                    cv)
        sv, share_v, share_q = attention_coherence(c, tq, t, a, False, None)
        _, wo2 = weight_stats(m.out_proj.weight, (0.0, 1.0 / (3.0 * e)))
        bm, b2 = weight_stats(m.out_proj.bias, (0.0, 0.0))
        q_out = e * wo2 * out[1] + b2
        _, share_core = attention_token_share(cv, tq, t, a)
        common = e * wo2 * (share_core * var_of(out) + out[0] ** 2) + b2 - bm * bm
        var_out = q_out - bm * bm
        token_share = min(max(common / var_out, 0.0), 1.0) if var_out > 0.0 else 0.0
        s_attn = e * wo2
        gains: dict[str, float] = {}
        coherent: dict[str, float] = {}
        for name, fan, w2, s, share in zip(names, fans, w2s, (sq, sk, sv),
                                           (share_q, 0.0, share_v), strict=True):
            gain = s_attn * s * fan * w2 * e / max(fan, 1)
            gains[name] = gains.get(name, 0.0) + gain
            coherent[name] = coherent.get(name, 0.0) + gain * share
        shares = {n: min(coherent[n] / gains[n], 1.0) for n in gains if gains[n] > 0.0}
        return (bm, q_out), gains, shares, _core_structural(names, (sq, sk, sv)), token_share

    @staticmethod
    def _sequence_axis(ctx: Ctx) -> int:
        return 1 if ctx.module is not None and ctx.module.batch_first else 0

    @staticmethod
    def _query_shape(ctx: Ctx) -> Any:
        query = ctx.arg(0, "query")
        return ctx.shape(query.name) if isinstance(query, Ref) else None

    @staticmethod
    def _coherence(ctx: Ctx) -> float:
        """The coherent share of the output's gradient along the sequence axis."""
        coh = getattr(ctx.est, "grad_coherence", {}).get(ctx.name)
        shape = _MHA._query_shape(ctx)
        return coh.along(shape, _MHA._sequence_axis(ctx)) if coh is not None and shape else 0.0

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        parts = _MHA._parts(ctx)
        return parts[0] if parts else pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        parts = _MHA._parts(ctx, _MHA._coherence(ctx))
        return parts[1] if parts else pass_backward(ctx)

    @staticmethod
    def structural(ctx: Ctx) -> dict[str, float]:
        """The attention core's gains, as for ``_SDPA.structural`` (the projections
        around it are weights: their gains are not by design)."""
        parts = _MHA._parts(ctx, _MHA._coherence(ctx))
        return parts[3] if parts else {}

def mha_coherence(ctx: Ctx, coh: Any) -> dict[str, tuple[float, Any, int]]:
    """Coherence nn.MultiheadAttention passes to its query and value inputs (as SDPA)."""

    shape = _MHA._query_shape(ctx)
    if not shape or len(shape) != 3:
        return {}
    axis = _MHA._sequence_axis(ctx)
    parts = _MHA._parts(ctx, coh.along(shape, axis))
    if not parts:
        return {}
    got: dict[str, tuple[float, Any, int]] = {}
    for name, share in parts[2].items():
        in_shape = ctx.shape(name)
        if share > 0.0 and in_shape is not None and len(in_shape) == 3:
            got[name] = (share, in_shape, axis)
    return got
