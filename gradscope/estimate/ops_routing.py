"""Op rules for ops that move, select or mask values: views and slicing, ``cat``, dropout,
``detach`` and constants.

Working in squared norms makes routing exactly gain 1 (``docs/static-estimate.md``):
a reshape, a permutation or a slice moves the gradient without scaling it.
``cat`` splits it by each input's share of the elements; dropout scales it by
``1 / (1 - p)`` in training; ``detach`` and constants pass none back.
"""

from __future__ import annotations

from gradscope.estimate.ops_base import Ctx, pass_forward, rule
from gradscope.estimate.statistics import EPS, Mom, numel
from gradscope.tracing.graph import Ref, node_record


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
        xm = pass_forward(ctx)
        p = _dropout_p(ctx)
        return None if xm is None else (xm[0], xm[1] / max(1.0 - p, EPS))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        p = _dropout_p(ctx)
        return {r: 1.0 / max(1.0 - p, EPS) for r in ctx.activations_in()[:1]}



def _route_forward(ctx: Ctx) -> Mom | None:
    """The moved tensor's moments, also when it is a weight read directly.

    ``weight[position_ids]`` (Whisper's and other learned position tables read by
    ``index``, ``weight.expand(...)``, ``weight.t()``) moves a parameter: there is
    no signal input, and without this the value would fall to the unit-variance
    prior, 625 times the second moment of a std-0.02 table, so that the LayerNorm
    after the embedding sum was given a gain 25x too small.
    """
    got = pass_forward(ctx)
    if got is not None:
        return got
    source = ctx.arg(0, "input")
    if isinstance(source, Ref) and node_record(ctx.est.graph, source.name).is_float:
        return ctx.mom(source)
    return None


@rule("neg", "abs", "masked_fill", "max_reduce", "view", "getitem", "split")
class _Route:
    """Ops that move or select values: moments pass, the gradient's squared norm is kept."""

    forward = staticmethod(_route_forward)
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



@rule("detach", "constant")
class _NoGrad:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        if ctx.data.op == "zeros_like":
            return 0.0, 0.0
        if ctx.data.op == "ones_like":
            return 1.0, 1.0
        return pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {}
