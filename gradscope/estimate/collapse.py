"""The stream's token-mean share: how much of a signal is the same vector at every position.

The forward sweep carries each node's mean and second moment as if the positions (tokens)
of one sample were independent draws. Attention breaks that: an output row is
``o_i = sum_j p_ij v_j`` and near-uniform rows (``p_ij ~ 1/T``, every attention at
initialisation) map every position to (nearly) the token mean of the values. Write the value
rows as a part common to all positions plus independent fluctuations, ``v_j = vbar + u_j``,
with a share ``c`` of the variance in ``vbar`` (in excess of chance: the mean of ``T``
independent rows holds ``1/T`` of their energy, which the independent-rows gain already
counts). Then, with ``A = E[sum_j p_ij^2]`` (``softmax_terms``),

    E||o_i - mean||^2 = Var[v] (c + (1 - c) A),

so the common part passes with its full gain while only the fluctuation is averaged down
to ``A ~ 1/T``. Mean field (``c = 0``) gives ``Var[v] A``. Of the output, the common part
is ``c`` plus the fluctuations' row mean ``(1 - c) / T_k``: its raw share is
``(c + (1 - c) / T_k) / (c + (1 - c) A)``, 1 for uniform rows (every output row is the
same vector), and the share carried is again its excess over the ``1 / T_q`` of chance.

The same share is what an equal-weight stack amplifies: each block's attention branch then
adds ``W_o W_v vbar`` in the direction the previous equal blocks already grew, so
``gradscope.estimate.tied`` adds it in amplitude with the branch's forward gain, which is
now ``g (c + (1 - c) A)`` instead of ``g A`` (``g`` the value/output projections' gain).
Measured on the 12-layer Post-LN ``nn.TransformerEncoder`` of deep-copied layers (T = 16),
the stream's token-mean share goes 0.08 -> 0.96 up the stack and the attention branch's
second moment 0.013 -> 0.15 (12x), which mean field kept at 0.013; the stream's second
moment before each LayerNorm reaches 1.76 against 1.10 predicted, and that LayerNorm's
backward gain ``1 / q_in`` is where the gradient's decay in mid-stack comes from.

How the share moves (a lower bound, like the gradient's coherent share in
``gradscope.estimate.coherence``, whose axis blocks :class:`Coherence` this reuses): it is
*set* by attention (``ops_attention.attention_token_share``; ``sdpa`` and
``nn.MultiheadAttention``); *kept* by ops that act on every position alike (a linear
layer: ``fan w^2 (c Var[x] + m_x^2) + E[b^2] - m_y^2`` of ``Var[y]``, since its bias and
the image of the input's unit means are the same vector at every position, which also
*sets* a share behind an activation with a non-zero mean, a ReLU's or GELU's; LayerNorm /
RMSNorm: per-position statistics over features, the same at every position when the
positions are, ``c E[gamma^2] / Var[y]``; residual additions: the common energies add, and
the excess of a coherent sum (equal blocks, ``tied``) is the cross term between the branch
and the earlier outputs of equal branches on the stream, which have the branch's own
composition, so a share ``c_branch`` of it is common; reshapes, transposes, permutes,
picks and splits, which move the axes; products with what carries no share of its own,
``x * o``: a per-feature gain or a number keeps ``E[o^2]`` of it, a per-position factor
such as a decomposed RMSNorm's ``rsqrt`` keeps ``E[o]^2``); *diluted* by dropout (a mask per
position: ``1 - p``) and activations (first Hermite term: ``E[phi']^2 c Var[x] / Var[phi(x)]``); and
*lost* (0, the old independent-positions assumption) at every op not listed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradscope.estimate.coherence import (
    _EXPANDS,
    _RESHAPES,
    _SHIFTS,
    INCOHERENT,
    Coherence,
    _base_op,
    _leading,
    _remap,
    axis_sources,
    block_of,
    canonical,
    locate,
    mean_slope,
)
from gradscope.estimate.statistics import Mom, var_of, weight_stats
from gradscope.tracing.graph import Ref, node_record


class CollapseForward:
    """The token-mean share of each node's output, carried through the forward sweep.

    ``state.token_share[n]`` is a :class:`Coherence` of node ``n``'s *variance*; the
    attention rules read their value input's share from it before the node's own entry is
    written here (after its rule and ``tied`` have given its moments).
    """

    def __init__(self, state: Any, tied: Any = None) -> None:
        self.state = state
        self.share: dict[str, Coherence] = state.token_share
        #: ``gradscope.estimate.tied.TiedBlocks``: which input of a coherent add is the branch.
        self.tied = tied

    def of(self, name: str) -> Coherence:
        return self.share.get(name, INCOHERENT)

    def run(self, ctx: Any, mom: Mom | None) -> None:
        """Set the share of ``ctx``'s node from its inputs' (rules in the module docstring)."""
        if mom is None:
            return
        try:
            got = self._rule(ctx, mom)
        except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
            got = INCOHERENT
        shape = ctx.shape()
        if got.share <= 0.0 or not got.blocks or shape is None:
            return
        blocks = canonical(shape, got.blocks)
        if blocks:
            self.share[ctx.name] = Coherence(min(got.share, 1.0), blocks)

    # -----------------------------------------------------------------------

    def _input(self, ctx: Any) -> tuple[str, Coherence, Mom] | None:
        first = ctx.first()
        if first is None:
            return None
        coh = self.of(first)
        xm = ctx.est.moments.get(first)
        if coh.share <= 0.0 or xm is None:
            return None
        return first, coh, xm

    def _rule(self, ctx: Any, mom: Mom) -> Coherence:
        key = ctx.data.key
        if key == "sdpa":
            return self._sdpa(ctx)
        if key == "mha":
            return self._mha(ctx)
        out_shape = ctx.shape()
        if out_shape is None:
            return INCOHERENT
        var_out = var_of(mom)
        if var_out <= 0.0:
            return INCOHERENT
        if key in ("add", "sub", "rsub"):
            return self._add(ctx, mom, out_shape)
        if key in ("linear", "addmm"):
            return self._dense(ctx, mom, out_shape)
        if key in ("mul", "div"):
            return self._product(ctx, mom, out_shape)
        got = self._input(ctx)
        if got is None:
            return INCOHERENT
        first, coh, xm = got
        in_shape = ctx.shape(first)
        if in_shape is None:
            return INCOHERENT
        if key in ("layer_norm", "rms_norm"):
            gamma = ctx.param_by_suffix("weight")
            _, g2 = weight_stats(gamma, (1.0, 1.0))
            norm = getattr(ctx.module, "normalized_shape", None) if ctx.module is not None \
                else ctx.arg(1, "normalized_shape")
            count = len(norm) if isinstance(norm, (list, tuple)) and norm else 1
            return _scaled(_leading(coh, out_shape, len(out_shape) - count),
                           coh.share * g2 / var_out)
        if key == "dropout":
            from gradscope.estimate.ops_routing import _dropout_p
            return _scaled(coh, coh.share * (1.0 - _dropout_p(ctx)))
        if key == "neg":
            return coh
        if key.startswith("activation:"):
            slope = mean_slope(ctx, xm)
            return _scaled(coh, slope * slope * coh.share * var_of(xm) / var_out)
        if key == "view":
            return self._routed(ctx, coh, in_shape, out_shape)
        if key == "split":  # pieces along one axis: the other axes keep their blocks
            dim = ctx.arg(2, "dim", 0)
            if not isinstance(dim, int) or not -len(in_shape) <= dim < len(in_shape):
                return INCOHERENT
            dim %= len(in_shape)
            if len(out_shape) != len(in_shape):
                return INCOHERENT
            return _remap(coh, in_shape, out_shape,
                          {a: a for a in range(len(in_shape)) if a != dim})
        if key == "getitem" and isinstance(ctx.arg(1), int) and tuple(in_shape) == \
                tuple(out_shape):
            return coh
        if key == "cat" and tuple(in_shape) == tuple(out_shape):
            # Every other piece is empty: a key/value cache's first call (Hugging Face's
            # ``torch.cat([past, new], dim=-2)`` with no past) passes its input as it is.
            return coh
        return INCOHERENT

    def _dense(self, ctx: Any, mom: Mom, out_shape: Sequence[int]) -> Coherence:
        """y = W x + b at every position: the common part is ``W xbar`` plus what is the
        same at every position anyway, the input's unit means through W and the bias:
        ``fan w^2 (c Var[x] + m_x^2) + E[b^2] - m_y^2`` of ``Var[y]``. Along the input's
        blocks when it has a common part, else along every position axis (the mean terms
        are the same for every sample and position)."""
        key = ctx.data.key
        first = ctx.first()
        xm = ctx.est.moments.get(first) if first else None
        w = ctx.weight("mat2", 2) if key == "addmm" else ctx.weight("weight", 1)
        if xm is None or w is None or w.dim() != 2 or len(out_shape) < 2:
            return INCOHERENT
        b = ctx.weight("input", 0) if key == "addmm" else ctx.weight("bias", 2)
        fan = int(w.shape[0]) if key == "addmm" else int(w.shape[1])
        _, w2 = weight_stats(w, (0.0, 1.0 / (3.0 * fan)))
        _, b2 = weight_stats(b, (0.0, 0.0)) if b is not None else (0.0, 0.0)
        coh = self.of(first) if first else INCOHERENT
        common = fan * w2 * (coh.share * var_of(xm) + xm[0] ** 2) + b2 - mom[0] ** 2
        if coh.share > 0.0:
            blocks = _leading(coh, out_shape, len(out_shape) - 1).blocks
        else:
            blocks = frozenset(block_of(out_shape, a) for a in range(len(out_shape) - 1)
                               if int(out_shape[a]) > 1)
        if not blocks:
            return INCOHERENT
        return _scaled(Coherence(1.0, blocks), common / var_of(mom))

    def _product(self, ctx: Any, mom: Mom, out_shape: Sequence[int]) -> Coherence:
        """y = x * o (or x / o, o a number), x carrying a share and o not: the common vector
        of x times what of o is the same at every position, like :meth:`_dense`'s
        ``E[o^2] (c Var[x] + m_x^2) - m_y^2`` of ``Var[y]``, with ``E[o^2]`` where o is
        constant along the share's blocks (a per-feature gain, RMSNorm's weight, a scale)
        and only ``E[o]^2`` where it varies along them (a per-position factor such as a
        decomposed RMSNorm's ``rsqrt(mean(x^2) + eps)``, nearly the same at every position
        when the positions are: its fluctuation is not common).

        Without it the share was lost at every decomposed RMSNorm (``x * rsqrt(...)``,
        then ``* weight``: Hugging Face Llama, Mistral, Qwen, T5), and each attention
        layer above the first averaged its values as if independent across positions: on an
        8-layer Llama (d 512, 128 tokens) the attention output was predicted at 0.097 rms
        against 0.26-0.42 measured, the residual stream at half its size, and the RMSNorm
        gains that divide by it twice too large (GS201 error on Llama-7B ``--meta``).
        """
        from gradscope.estimate.ops_arith import _binary

        a, b = _binary(ctx)
        pairs = ((a, b), (b, a)) if ctx.data.key == "mul" else ((a, b),)
        carrying = [(x, o) for x, o in pairs
                    if isinstance(x, Ref) and self.of(x.name).share > 0.0]
        if len(carrying) != 1:
            return INCOHERENT  # nothing common, or a product of two common signals
        x, o = carrying[0]
        if isinstance(o, Ref) and (o.name == x.name or self.of(o.name).share > 0.0):
            return INCOHERENT
        om = ctx.mom(o)
        if ctx.data.key == "div":
            if isinstance(o, Ref) or om is None or om[0] == 0.0:
                return INCOHERENT  # 1/o's moments are known only for a number
            om = (1.0 / om[0], 1.0 / om[1])
        xm = ctx.est.moments.get(x.name)
        x_shape = ctx.shape(x.name)
        if om is None or xm is None or x_shape is None:
            return INCOHERENT
        coh = self.of(x.name)
        fitted = _remap(coh, x_shape, out_shape,
                        {a: a + len(out_shape) - len(x_shape) for a in range(len(x_shape))})
        if not fitted.blocks:
            return INCOHERENT
        o_shape = ctx.shape(o.name) if isinstance(o, Ref) else ()
        constant = o_shape is not None and all(
            _broadcast_size(o_shape, out_shape, block) == 1 for block in fitted.blocks)
        o2 = om[1] if constant else om[0] * om[0]
        common = o2 * (fitted.share * var_of(xm) + xm[0] ** 2) - mom[0] ** 2
        return _scaled(fitted, common / var_of(mom))

    def _sdpa(self, ctx: Any) -> Coherence:
        from gradscope.estimate.ops_attention import sdpa_value_share
        found = sdpa_value_share(ctx)
        out_shape = ctx.shape()
        if found is None or out_shape is None or len(out_shape) < 2:
            return INCOHERENT
        _, share = found
        return Coherence(share, frozenset({block_of(out_shape, len(out_shape) - 2)}))

    @staticmethod
    def _mha(ctx: Any) -> Coherence:
        """nn.MultiheadAttention: the share its rule computes, along the sequence axis."""
        from gradscope.estimate.ops_attention import _MHA
        parts = _MHA._parts(ctx)
        out_shape = ctx.shape()
        if parts is None or not out_shape or parts[4] <= 0.0:
            return INCOHERENT
        axis = _MHA._sequence_axis(ctx) if len(out_shape) == 3 else 0
        return Coherence(parts[4], frozenset({block_of(out_shape, axis)}))

    def _add(self, ctx: Any, mom: Mom, out_shape: Sequence[int]) -> Coherence:
        """Common energies add over the blocks both inputs share; a coherent excess (equal
        blocks, ``tied``) splits by the parts' common alignment (module docstring)."""
        parts: list[tuple[float, float, frozenset[Any]]] = []
        found = self.tied.by_add.get(ctx.name) if self.tied is not None else None
        branch = found[0].outs[found[1]] if found is not None else None
        branch_share: float | None = None
        for arg in ctx.args[:2]:
            if not isinstance(arg, Ref) or node_record(ctx.est.graph, arg.name).role == "param":
                continue
            am = ctx.est.moments.get(arg.name)
            shape = ctx.shape(arg.name)
            if am is None or shape is None:
                return INCOHERENT
            coh = self.of(arg.name)
            fitted = _remap(coh, shape, out_shape,
                            {a: a + len(out_shape) - len(shape) for a in range(len(shape))}) \
                if coh.share > 0.0 else INCOHERENT
            parts.append((fitted.share, var_of(am), fitted.blocks))
            if arg.name == branch:
                branch_share = fitted.share
        if len(parts) != 2 or all(s <= 0.0 for s, _, _ in parts):
            return INCOHERENT
        (ca, va, ba), (cb, vb, bb) = parts
        blocks = ba & bb if ca > 0.0 and cb > 0.0 else (ba or bb)
        if not blocks:
            return INCOHERENT
        var_out = var_of(mom)
        common = ca * va + cb * vb
        excess = var_out - va - vb
        if excess > 0.0 and branch_share is not None:
            common += excess * branch_share
        return Coherence(min(common / var_out, 1.0), blocks)

    @staticmethod
    def _routed(ctx: Any, coh: Coherence, in_shape: Sequence[int],
                out_shape: Sequence[int]) -> Coherence:
        """Reshapes keep the blocks; swaps, permutes and picks move them (input -> output)."""
        op = _base_op(str(ctx.data.op))
        ndim = len(in_shape)
        if op in _RESHAPES:
            return coh if math.prod(in_shape) == math.prod(out_shape) else INCOHERENT
        if op in _SHIFTS:
            return coh if tuple(in_shape) == tuple(out_shape) else INCOHERENT
        if op in _EXPANDS:
            offset = len(out_shape) - ndim
            return _remap(coh, in_shape, out_shape, {a: a + offset for a in range(ndim)})
        sources = axis_sources(ctx, op, in_shape, out_shape)
        if sources is not None:
            return _remap(coh, in_shape, out_shape, {i: o for o, i in sources.items()})
        return INCOHERENT


def _broadcast_size(shape: Sequence[int], out_shape: Sequence[int], block: Any) -> int:
    """The size of a (right-aligned, broadcast) operand along the axis ``block`` lies in;
    0 when the block cannot be placed."""
    where = locate(out_shape, block)
    if where is None:
        return 0
    axis = where[0] - (len(out_shape) - len(shape))
    return 1 if axis < 0 else int(shape[axis])


def _scaled(coh: Coherence, share: float) -> Coherence:
    if not coh.blocks or not math.isfinite(share) or share <= 0.0:
        return INCOHERENT
    return Coherence(min(share, 1.0), coh.blocks)


