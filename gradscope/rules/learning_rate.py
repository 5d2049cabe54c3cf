"""GS6xx, learning rate: the first update of each layer relative to its weights, with --lr.

The probe computes each layer's first optimiser step without taking it; the usual band
of update/weight ratios is [1e-4, 1e-2] around 1e-3. These are reported as facts, with
no learning-rate factor: a factor computed from that band rescued 3 of 24 failing
training runs and worsened 22 of 36 that trained (issue 14's experiment), so a factor
is advised only where a measured run supports it. Warmup advice (here and in GS703) is
a share of the planned run (``--steps``, at most 10%), and omitted without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.records import Finding, Recommendation
from gradscope.rules.base import Check, Rule, RuleFamily, location, op_of

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS601 = Rule(
    code="GS601",
    name="learning-rate-scale",
    category="learning_rate",
    severity="info",
    summary="With the given learning rate, the first update moves the weights by far "
    "more or far less than ~1e-3 of their norm (a fact, no factor advised).",
    what="The probe computed each layer's first optimiser step (SGD: lr * g; Adam/AdamW: "
    "lr * g / (|g| + eps), plus decoupled decay) without taking it, and compared its norm "
    "with the weight's. The median layer falls outside [1e-4, 1e-2].",
    why="An update/weight ratio around 1e-3 is the usual healthy range: far above it the "
    "first steps overwrite the initialisation (and diverge), far below it nothing learns.",
    fix="Check the learning rate with a short range test on your data (a few dozen steps "
    "at the rate and at factors of it): the ratio alone does not say which rate trains, "
    "and Adam's first step is lr-sized whatever the gradient. Give --steps for a warmup "
    "length.",
    references=("CS231n, Neural Networks Part 3: ratio of weights:updates",
                "Kingma & Ba 2015, Adam: A Method for Stochastic Optimization"),
)

GS602 = Rule(
    code="GS602",
    name="learning-rate-layer-outlier",
    category="learning_rate",
    severity="info",
    summary="With the given learning rate, some layers' first update is outside "
    "[1e-4, 1e-2] of their weight norm while the median layer's is fine.",
    what="The probe computed each layer's first optimiser step without taking it; these "
    "layers fall outside the healthy band of update/weight ratios.",
    why="Layers stepping 1e-2 of their norm or more are rewritten in a few steps; layers "
    "below 1e-4 barely move.",
    fix="Look at those layers' initialisation scale first; a parameter group of their own "
    "is an option once a measured run shows the layer lagging or diverging.",
    references=("CS231n, Neural Networks Part 3: ratio of weights:updates",),
)

#: The healthy band of update/weight ratios for the learning-rate check.
UPDATE_RATIO_BAND = (1e-4, 1e-2)
UPDATE_RATIO_TARGET = 1e-3


def check_learning_rate(analysis: Analysis) -> list[Finding]:
    probe = analysis.probe
    if probe is None or probe.lr is None:
        return []
    ratios = sorted(v for v in probe.update_ratio.values()
                    if v is not None and math.isfinite(v) and v > 0)
    if not ratios:
        return []
    median = ratios[len(ratios) // 2]
    lo, hi = UPDATE_RATIO_BAND
    if lo <= median <= hi:
        return []
    worst = max(probe.update_ratio, key=lambda n: abs(math.log10(
        probe.update_ratio[n] or UPDATE_RATIO_TARGET) - math.log10(UPDATE_RATIO_TARGET)))
    direction = "large" if median > hi else "small"
    warmup = warmup_recommendation(probe.optimizer, analysis.steps)
    return [GS601.finding(
        f"Learning rate {probe.lr:g} with {probe.optimizer}: the median layer's first update "
        f"is {median:.1e} of its weight norm, {direction}r than the usual band "
        f"[{lo:g}, {hi:g}]. No factor is advised: the ratio alone does not say which rate "
        f"trains (run a short learning-rate range test on your data).",
        location(analysis, worst), None, [warmup] if warmup and direction == "large" else [],
        {"median_update_ratio": median, "lr": probe.lr})]


#: The most of a planned run that warmup advice may take.
WARMUP_SHARE = 0.1


def warmup_recommendation(optimizer: str | None, steps: int | None) -> Recommendation | None:
    """Linear warmup over a share of the planned run, or None when its length is unknown.

    Adam/AdamW: 2 / (1 - beta2) steps, 2000 for PyTorch's beta2 = 0.999 (the
    second-moment estimate is unreliable until then, Ma & Yarats 2021), but never more
    than 10% of the run: a fixed 2,000 steps took all of a 300-step run and worsened 16
    of 29 runs that trained (issue 14). SGD: 10% of the run, the upper end of Goyal et
    al. (2017)'s 5 epochs of 90. Without ``--steps`` no length follows, so none is given.
    """
    if steps is None:
        return None
    cap = max(1, round(WARMUP_SHARE * steps))
    if optimizer in ("adam", "adamw"):
        length = min(round(2 / (1 - 0.999)), cap)
        why = (f"2 / (1 - beta2) = 2000 for beta2 = 0.999 (Ma & Yarats 2021), at most "
               f"{WARMUP_SHARE:.0%} of the {steps} planned steps")
    else:
        length = cap
        why = f"{WARMUP_SHARE:.0%} of the {steps} planned steps (Goyal et al. 2017)"
    return Recommendation(
        "warmup",
        f"Warm the learning rate up linearly over the first {length} steps ({why}), so early "
        "large updates cannot destroy the initialisation.",
        "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, "
        f"total_iters={length})",
        action={"op": "warmup", "steps": length, "start_factor": 0.1})


def check_layer_learning_rates(analysis: Analysis) -> list[Finding]:
    """GS602: layers outside the band while the median layer is inside it."""
    probe = analysis.probe
    if probe is None or probe.lr is None:
        return []
    ratios = {n: v for n, v in probe.update_ratio.items()
              if v is not None and math.isfinite(v) and v > 0}
    if not ratios:
        return []
    values = sorted(ratios.values())
    median = values[len(values) // 2]
    lo, hi = UPDATE_RATIO_BAND
    if not lo <= median <= hi:
        return []  # GS601 covers the whole model
    findings = []
    for node in analysis.traced.order():
        ratio = ratios.get(node)
        if ratio is None or lo <= ratio <= hi:
            continue
        findings.append(GS602.finding(
            f"{op_of(analysis, node)}: first update is {ratio:.1e} of its weight norm with lr "
            f"{probe.lr:g} (band [{lo:g}, {hi:g}]; median layer {median:.1e}).",
            location(analysis, node), None, [],
            {"update_ratio": ratio, "median_update_ratio": median}))
    return findings


FAMILY = RuleFamily(
    number=6,
    rules=(GS601, GS602),
    checks=(Check(("GS601",), check_learning_rate),
            Check(("GS602",), check_layer_learning_rates)),
)
