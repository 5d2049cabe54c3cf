"""GS3xx, saturation: pre-activations in the flat tails of sigmoid-like activations.

GS301 predicts the share from the estimate's pre-activation moments (a Gaussian
tail past the activation's edge in :data:`gradscope.tracing.ops.SATURATION_EDGE`);
GS302 counts it on the probe batches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.records import Finding, Recommendation
from gradscope.rules.base import GLOROT, SCHOENHOLZ, Check, Rule, RuleFamily, location, op_of
from gradscope.tracing.ops import SATURATION_EDGE

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS301 = Rule(
    code="GS301",
    name="saturation-predicted",
    category="saturation",
    severity="warning",
    summary="The static estimate predicts many sigmoid/tanh outputs in their flat tails.",
    what="From the pre-activation's predicted mean and variance, the share of units whose "
    "derivative is below 1% of its maximum (|z| > 2.99 for tanh, > 5.99 for sigmoid, "
    "outside the linear band of hardtanh) is large.",
    why="A saturated unit passes almost no gradient: its derivative is near 0, and it "
    "stays saturated because its inputs' weights get no gradient either.",
    fix="Shrink the weights feeding the activation (the critical sigma_w = 1 for tanh with "
    "zero bias), normalise its input, or use a non-saturating activation.",
    references=(GLOROT, SCHOENHOLZ),
)

GS302 = Rule(
    code="GS302",
    name="saturation-measured",
    category="saturation",
    severity="warning",
    summary="The probe measured many sigmoid/tanh/hardtanh outputs in their flat tails.",
    what="On the probe batches, the share of the activation's outputs whose derivative is "
    "below 1% of its maximum is above the threshold.",
    why="Saturated units pass (almost) no gradient back; a layer with most units saturated "
    "starves everything below it.",
    fix="Lower the initial weight scale feeding the activation, add normalisation before "
    "it, or swap it for a non-saturating one (ReLU/GELU).",
    references=(GLOROT,),
)


def _tail_share(mean: float, var: float, edge: float) -> float:
    sd = math.sqrt(max(var, 1e-30))
    upper = 0.5 * math.erfc((edge - mean) / (sd * math.sqrt(2)))
    lower = 0.5 * math.erfc((edge + mean) / (sd * math.sqrt(2)))
    return upper + lower


def saturation_fixes(analysis: Analysis) -> list[Recommendation]:
    def build() -> list[Recommendation]:
        fixer = analysis.fixer
        found = [fixer.initialization("low"), fixer.activation_swap("low")]
        return [r for r in found if r is not None]

    return list(analysis.remember("saturation_fixes", build))


def check_predicted_saturation(analysis: Analysis) -> list[Finding]:
    """GS301, from the pre-activation moments."""
    t = analysis.thresholds
    worst: tuple[str, float] | None = None
    for node in analysis.traced.order():
        rec = analysis.traced.node(node)
        if rec.activation not in SATURATION_EDGE:
            continue
        ins = [r for r in rec.inputs if analysis.traced.node(r).role != "param"]
        moments = analysis.mean_and_variance(ins[0]) if ins else None
        if moments is None:
            continue
        share = _tail_share(moments[0], moments[1], SATURATION_EDGE[rec.activation])
        if share >= t.saturated_fraction and (worst is None or share > worst[1]):
            worst = (node, share)
    if worst is None:
        return []
    node, share = worst
    return [GS301.finding(
        f"{op_of(analysis, node)}: {share:.0%} of its outputs are predicted in the flat "
        f"tails (derivative < 1% of max; threshold {t.saturated_fraction:.0%}).",
        location(analysis, node), "error" if share >= 0.5 else "warning",
        saturation_fixes(analysis), {"saturated_fraction": share,
                                     "threshold": t.saturated_fraction})]


def check_measured_saturation(analysis: Analysis) -> list[Finding]:
    """GS302, counted on the probe batches."""
    t = analysis.thresholds
    probe = analysis.probe
    if probe is None or not probe.saturated_fraction:
        return []
    node = max(probe.saturated_fraction,
               key=lambda n: (probe.saturated_fraction[n] or 0.0, -analysis.traced.node(n).index))
    share = probe.saturated_fraction[node] or 0.0
    if share < t.saturated_fraction:
        return []
    return [GS302.finding(
        f"{op_of(analysis, node)}: {share:.0%} of its outputs were saturated on the "
        f"probe batches (derivative < 1% of max; threshold {t.saturated_fraction:.0%}).",
        location(analysis, node), "error" if share >= 0.5 else "warning",
        saturation_fixes(analysis), {"saturated_fraction": share,
                                     "threshold": t.saturated_fraction})]


FAMILY = RuleFamily(
    number=3,
    rules=(GS301, GS302),
    checks=(Check(("GS301",), check_predicted_saturation),
            Check(("GS302",), check_measured_saturation)),
)
