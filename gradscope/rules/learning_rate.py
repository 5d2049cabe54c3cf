"""GS6xx, learning rate: the first update of each layer relative to its weights, with --lr.

The probe computes each layer's first optimiser step without taking it; the
healthy band of update/weight ratios is [1e-4, 1e-2] around a target of 1e-3.
Warmup advice, offered here and by GS703, follows from the optimiser.
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
    severity="warning",
    summary="With the given learning rate, the first update moves the weights by far "
    "more or far less than ~1e-3 of their norm.",
    what="The probe computed each layer's first optimiser step (SGD: lr * g; Adam/AdamW: "
    "lr * g / (|g| + eps), plus decoupled decay) without taking it, and compared its norm "
    "with the weight's. The median layer falls outside [1e-4, 1e-2].",
    why="An update/weight ratio around 1e-3 is the usual healthy range: far above it the "
    "first steps overwrite the initialisation (and diverge), far below it nothing learns.",
    fix="Scale the learning rate by the factor given (it brings the median ratio to 1e-3), "
    "and warm it up over the first few hundred to thousand steps.",
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
    fix="Put those layers in their own parameter group with a learning rate scaled by the "
    "factor given, or fix their initialisation scale.",
    references=("CS231n, Neural Networks Part 3: ratio of weights:updates",),
)

#: The healthy band of update/weight ratios for the learning-rate check.
UPDATE_RATIO_BAND = (1e-4, 1e-2)
UPDATE_RATIO_TARGET = 1e-3
_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


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
    factor = UPDATE_RATIO_TARGET / median
    new_lr = probe.lr * factor
    worst = max(probe.update_ratio, key=lambda n: abs(math.log10(
        probe.update_ratio[n] or UPDATE_RATIO_TARGET) - math.log10(UPDATE_RATIO_TARGET)))
    direction = "large" if median > hi else "small"
    return [GS601.finding(
        f"Learning rate {probe.lr:g} with {probe.optimizer} is too {direction}: the median "
        f"layer's first update is {median:.1e} of its weight norm (healthy band "
        f"[{lo:g}, {hi:g}]).",
        location(analysis, worst), None,
        [Recommendation("learning_rate",
                        f"Multiply the learning rate by {factor:.3g} (lr = {new_lr:.3g}) to bring "
                        f"the median update/weight ratio to {UPDATE_RATIO_TARGET:g}.",
                        f"optimizer = torch.optim.{_OPTIMIZERS.get(probe.optimizer or '', 'SGD')}"
                        f"(model.parameters(), lr={new_lr:.3g})"),
         warmup_recommendation(probe.optimizer)],
        {"median_update_ratio": median, "lr": probe.lr, "factor": factor})]


def warmup_recommendation(optimizer: str | None) -> Recommendation:
    """Linear warmup with a step count that follows from the optimiser.

    Adam/AdamW: 2 / (1 - beta2) steps, 2000 for PyTorch's beta2 = 0.999: the
    second-moment estimate is unreliable until then (Ma & Yarats 2021). SGD: 5
    epochs, the large-batch rule of Goyal et al. (2017).
    """
    if optimizer in ("adam", "adamw"):
        steps = round(2 / (1 - 0.999))
        return Recommendation(
            "warmup",
            f"Warm the learning rate up linearly over the first {steps} steps "
            "(2 / (1 - beta2) for beta2 = 0.999, Ma & Yarats 2021), so early large updates "
            "cannot destroy the initialisation.",
            "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, "
            f"total_iters={steps})")
    return Recommendation(
        "warmup",
        "Warm the learning rate up linearly over the first 5 epochs (Goyal et al. 2017), so "
        "early large updates cannot destroy the initialisation.",
        "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, "
        "total_iters=5 * steps_per_epoch)")


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
        factor = UPDATE_RATIO_TARGET / ratio
        module = analysis.traced.node(node).module or node
        findings.append(GS602.finding(
            f"{op_of(analysis, node)}: first update is {ratio:.1e} of its weight norm with lr "
            f"{probe.lr:g} (band [{lo:g}, {hi:g}]; median layer {median:.1e}).",
            location(analysis, node), None,
            [Recommendation(
                "learning_rate",
                f"Give {module} its own parameter group with lr = {probe.lr * factor:.3g} "
                f"({factor:.3g}x), which brings its ratio to {UPDATE_RATIO_TARGET:g}.",
                f"special = set(model.get_submodule({module!r}).parameters())\n"
                "groups = [{\"params\": [p for p in model.parameters() if p not in special]},\n"
                f"          {{\"params\": list(special), \"lr\": {probe.lr * factor:.3g}}}]\n"
                f"optimizer = torch.optim.{_OPTIMIZERS.get(probe.optimizer or '', 'SGD')}"
                f"(groups, lr={probe.lr:g})")],
            {"update_ratio": ratio, "median_update_ratio": median, "factor": factor}))
    return findings


FAMILY = RuleFamily(
    number=6,
    rules=(GS601, GS602),
    checks=(Check(("GS601",), check_learning_rate),
            Check(("GS602",), check_layer_learning_rates)),
)
