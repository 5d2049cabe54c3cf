"""GS5xx, non-finite values: where NaN/Inf first appears, forward (GS501) or backward (GS502)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.records import Finding, Location
from gradscope.rules.base import PASCANU, Check, Rule, RuleFamily, location, op_of
from gradscope.steps import TrainingRecord

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS501 = Rule(
    code="GS501",
    name="nonfinite-forward",
    category="nonfinite",
    severity="error",
    summary="NaN or Inf appeared in the forward pass.",
    what="A node of the graph produced NaN or infinite values on the probe inputs; the "
    "finding names the first such node in forward order.",
    why="Every gradient downstream of a non-finite activation is non-finite too: one "
    "optimiser step turns all weights into NaN.",
    fix="Guard the op (clamp before log/sqrt/division, add an epsilon), check the "
    "inputs' range, and lower the initial weight scale if activations overflow.",
    references=("Micikevicius et al. 2018, Mixed Precision Training (ICLR)",),
)

GS502 = Rule(
    code="GS502",
    name="nonfinite-backward",
    category="nonfinite",
    severity="error",
    summary="NaN or Inf appeared in the backward pass while the forward was finite.",
    what="The gradient at some node is non-finite although its forward value is finite; "
    "the finding names the node closest to the output where it starts.",
    why="Derivatives can overflow where values do not (sqrt at 0, pow with small bases, "
    "division by small numbers): the first step writes NaN into the weights.",
    fix="Add an epsilon inside sqrt/pow/division, clamp the operand, or clip the "
    "gradient norm.",
    references=(PASCANU,),
)


def _backward_source(analysis: Analysis, node: str, bad: set[str]) -> str:
    """The op whose backward made ``node``'s gradient non-finite: a consumer whose own is finite.

    ``node`` is the last node (forward order) with a non-finite gradient, so every
    consumer's gradient is finite and one of their backward functions (sqrt at 0,
    pow with a small base) produced the NaN/Inf: that op is what needs the guard.
    Consumers with a measured finite gradient come first; ``node`` when it has none.
    """
    graph = analysis.traced.graph
    sq = analysis.probe.sq_norm if analysis.probe is not None else {}
    consumers = [s for s in graph.successors(node)
                 if s not in bad and analysis.traced.node(s).role == "compute"]
    if not consumers:
        return node
    return min(consumers, key=lambda s: (not math.isfinite(sq.get(s, math.nan)),
                                         analysis.traced.node(s).index))


def check_nonfinite_forward(analysis: Analysis) -> list[Finding]:
    probe = analysis.probe
    if probe is None or not probe.nonfinite_forward:
        return []
    first = probe.nonfinite_forward[0]
    return [GS501.finding(
        f"NaN/Inf first appears in the forward pass at {op_of(analysis, first)}; "
        f"{len(probe.nonfinite_forward) - 1} node(s) downstream are non-finite too.",
        location(analysis, first),
        evidence={"first_node": first, "nonfinite_nodes": len(probe.nonfinite_forward)})]


def check_nonfinite_backward(analysis: Analysis) -> list[Finding]:
    probe = analysis.probe
    if probe is None or probe.nonfinite_forward or not probe.nonfinite_backward:
        return []
    bad = list(probe.nonfinite_backward)
    start = bad[-1]  # closest to the output in forward order: where backward breaks
    op = _backward_source(analysis, start, set(bad))
    where = (f"in the backward of {op_of(analysis, op)}: its input "
             f"{op_of(analysis, start)} receives a non-finite gradient"
             if op != start else f"at {op_of(analysis, start)}")
    return [GS502.finding(
        f"The gradient turns NaN/Inf {where} although the forward pass is finite; "
        f"{len(bad)} node(s) upstream receive non-finite gradients.",
        location(analysis, op),
        evidence={"first_node": start, "op_node": op, "nonfinite_nodes": len(bad)})]


GS503 = Rule(
    code="GS503",
    name="nonfinite-in-training",
    category="nonfinite",
    severity="error",
    summary="The loss or the gradients turned NaN/Inf during training.",
    what="Watching the first steps of a training run (gradscope.watch): the first step "
    "whose loss or total gradient norm is not finite, and the modules whose parameters' "
    "gradients were not finite at that step.",
    why="One optimiser step with a non-finite gradient writes NaN into the weights: the "
    "run is lost from there, usually after the gradient norm grew for a few steps "
    "(GS203).",
    fix="Clip the gradient norm, lower the learning rate or warm it up; if it starts in "
    "one module, guard its ops (epsilon inside sqrt/log/division).",
    references=(PASCANU,),
)


def check_step_nonfinite(record: TrainingRecord) -> list[Finding]:
    step = record.first_nonfinite_step
    if step is None:
        return []
    mods = record.first_nonfinite_modules
    loss = record.losses[step] if step < len(record.losses) else None
    what = "the loss" if loss is not None and not math.isfinite(loss) else "the gradient"
    where = (f"; non-finite gradients in {len(mods)} module(s), first {mods[0]}" if mods
             else "")
    norms = [v for v in record.grad_norms[:step] if v is not None and math.isfinite(v)]
    before = f" (the gradient norm was {norms[-1]:.3g} the step before)" if norms else ""
    return [GS503.finding(
        f"At step {step} {what} turned NaN/Inf{where}{before}.",
        Location(module=mods[0]) if mods else Location(),
        evidence={"step": step, "modules": len(mods),
                  "grad_norm_before": norms[-1] if norms else None})]

FAMILY = RuleFamily(
    number=5,
    rules=(GS501, GS502, GS503),
    step_checks=(Check(("GS503",), check_step_nonfinite),),
    checks=(Check(("GS501",), check_nonfinite_forward),
            Check(("GS502",), check_nonfinite_backward)),
)
