"""GS4xx, dead units: ReLU-like units never active on the probe, and biases that switch them off.

GS401 counts units dead on every probe sample; GS402 finds weight layers before a
ReLU whose bias mean is far below zero in pre-activation standard deviations
(measured on the weights by ``analysis.fixer``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.records import Finding, Location, Severity
from gradscope.rules.base import HE, LU, Check, Rule, RuleFamily, location, op_of
from gradscope.steps import TrainingRecord

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS401 = Rule(
    code="GS401",
    name="dead-units-measured",
    category="dead_units",
    severity="warning",
    summary="Many ReLU-like units never activated on any probe sample.",
    what="A unit (a channel for convolutions) whose output was 0 (ReLU) or negative on "
    "every probe sample is dead: its gradient, and its input weights' gradient, are 0.",
    why="Dead units never recover under gradient descent; a layer whose units are all dead "
    "cuts the gradient to every layer below it.",
    fix="Zero the biases at initialisation (strongly negative biases kill ReLUs), use "
    "Kaiming fan_in, lower the learning rate, or use LeakyReLU/GELU.",
    references=(LU, HE),
)

GS402 = Rule(
    code="GS402",
    name="negative-bias-before-relu",
    category="dead_units",
    severity="warning",
    summary="A strongly negative bias before a ReLU is predicted to switch most of its "
    "units off.",
    what="The layer's bias is negative on average by more than half the pre-activation's "
    "standard deviation (predicted by the static estimate), so most units are inactive "
    "on most samples, and stacked layers compound it.",
    why="A ReLU unit that is off passes no gradient; negative biases in several layers in a "
    "row switch whole layers off (dying ReLU).",
    fix="Initialise biases to 0 (or a small positive value) before ReLUs.",
    references=(LU,),
)


def check_dead_units(analysis: Analysis) -> list[Finding]:
    """GS401: the first layer (forward order) with many units dead on every probe sample."""
    probe = analysis.probe
    if probe is None or probe.nonfinite_forward:
        return []
    t = analysis.thresholds
    dead = {n: v for n, v in probe.dead_fraction.items() if v is not None}
    bad = [n for n in analysis.traced.order() if dead.get(n, 0.0) >= t.dead_fraction]
    if not bad:
        return []
    first = bad[0]
    worst = max(dead[n] for n in bad)
    all_dead = [n for n in bad if dead[n] >= 1.0]
    severity: Severity = "error" if all_dead else "warning"
    message = (f"{op_of(analysis, first)}: {dead[first]:.0%} of its units never activated on "
               f"any probe sample; {len(bad)} layer(s) at or above {t.dead_fraction:.0%}")
    if all_dead:
        message += (f", {len(all_dead)} entirely dead (first: "
                    f"{analysis.traced.node(all_dead[0]).module or all_dead[0]}): no gradient "
                    "reaches any layer below them")
    fixer = analysis.fixer
    biased = fixer.negative_bias_layers()
    fixes = [r for r in (fixer.zero_bias([n for n, _ in biased]) if biased else None,
                         fixer.initialization("low")) if r is not None]
    return [GS401.finding(message + ".", location(analysis, first), severity, fixes,
                          {"dead_fraction": dead[first], "worst_dead_fraction": worst,
                           "dead_layers": len(bad), "threshold": t.dead_fraction})]


def check_negative_bias(analysis: Analysis) -> list[Finding]:
    """GS402: strongly negative biases before ReLUs (static)."""
    found = analysis.fixer.negative_bias_layers()
    if not found:
        return []
    node, score = min(found, key=lambda item: item[1])
    off = 0.5 * math.erfc(score / math.sqrt(2))  # P(z < 0) for z ~ N(score, 1)
    fix = analysis.fixer.zero_bias([n for n, _ in found])
    return [GS402.finding(
        f"{len(found)} layer(s) before a ReLU have a bias mean below "
        f"-{analysis.thresholds.negative_bias:g} pre-activation std; worst "
        f"{op_of(analysis, node)} at {score:.2f} std"
        f"{' or below (its input is already zero)' if score <= -10 else ''}: about {off:.0%} "
        "of its units are off on a typical sample.",
        location(analysis, node), None, [fix] if fix else [],
        {"bias_in_std": score, "layers": len(found), "off_fraction": off})]


GS403 = Rule(
    code="GS403",
    name="units-dying-in-training",
    category="dead_units",
    severity="warning",
    summary="During training, half of a ReLU-like layer's units died.",
    what="Watching the first steps of a training run (gradscope.watch): a ReLU-like "
    "module has at least half its units inactive on every sample of the batch at the "
    "last recorded step, at least 10 points more than at step 0.",
    why="A unit inactive on every input gets no gradient and never recovers: the first "
    "updates (a large step, a negative bias drift) killed capacity the network had at "
    "initialisation, which the before-training check (GS401) could not see.",
    fix="Lower the learning rate or warm it up; use LeakyReLU/GELU in that layer; "
    "initialise biases at zero or slightly positive; normalise before the activation.",
    references=(HE, LU),
)

#: Half the units, and a rise of 10 points since step 0 (dead at init is GS401's).
DYING_SHARE, DYING_RISE = 0.5, 0.1


def check_step_dying(record: TrainingRecord) -> list[Finding]:
    findings = []
    for name in record.rectifiers:
        series = record.series(name, "dead_fraction")
        if len(series) < 2:
            continue
        (_, start), (step, end) = series[0], series[-1]
        if end >= DYING_SHARE and end - start >= DYING_RISE:
            findings.append(GS403.finding(
                f"{name} ({record.modules.get(name, '?')}) has {end:.0%} of its units dead "
                f"at step {step}, up from {start:.0%} at step 0.",
                Location(module=name),
                evidence={"step": step, "dead_fraction": end, "dead_fraction_step0": start}))
    return findings

FAMILY = RuleFamily(
    number=4,
    rules=(GS401, GS402, GS403),
    checks=(Check(("GS401",), check_dead_units), Check(("GS402",), check_negative_bias)),
    step_checks=(Check(("GS403",), check_step_dying),),
)
