"""GS8xx, tracing: which tracer recorded the graph, and how much of it the estimate understands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradscope.records import Finding, Location
from gradscope.rules.base import SCHOENHOLZ, Check, Rule, RuleFamily

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS801 = Rule(
    code="GS801",
    name="trace-fallback",
    category="trace",
    severity="info",
    summary="torch.fx symbolic tracing failed; a fallback tracer recorded the graph.",
    what="gradscope tries torch.fx.symbolic_trace, then a runtime graph recorded with "
    "module hooks during one forward without gradients, then torch.export.export (export "
    "before the recorder with --no-probe on real weights). This model needed a fallback; "
    "the report says why each earlier tracer failed.",
    why="torch.export graphs are at the level of aten ops, so module paths come from "
    "nn_module_stack; a runtime graph records only the path the example inputs took "
    "through data-dependent branches, so other branches are not analysed.",
    fix="Nothing is required. For a fully symbolic graph, move data-dependent control "
    "flow out of forward or mark the offending submodule as a leaf.",
    references=("PyTorch docs: torch.fx limitations of symbolic tracing",),
)

GS802 = Rule(
    code="GS802",
    name="low-op-coverage",
    category="trace",
    severity="warning",
    summary="The static estimate understands fewer than 90% of the graph's operations.",
    what="Ops the estimator does not model pass the signal through with gain 1; the "
    "finding lists them. Below 90% coverage the static estimate is a rough guide only.",
    why="An unknown op may scale the gradient by any factor; the probe still measures "
    "it, the prediction cannot.",
    fix="Trust the probe's figures for these nodes; report the op names so gradscope "
    "can learn them.",
    references=(SCHOENHOLZ, "Reed et al. 2022, torch.fx: Practical Program Capture and "
                "Transformation for Deep Learning in Python (MLSys)"),
)


def check_tracer(analysis: Analysis) -> list[Finding]:
    traced = analysis.traced
    if traced.method == "symbolic_trace":
        return []
    failed = [a for a in traced.attempts if not a.ok]
    why = "; ".join(f"{a.method} failed: {a.message}" for a in failed)
    return [GS801.finding(f"Graph recorded with {traced.method} ({why}).", Location(),
                          evidence={"method": traced.method})]


def check_coverage(analysis: Analysis) -> list[Finding]:
    est = analysis.estimate
    if est.coverage >= analysis.thresholds.min_coverage:
        return []
    return [GS802.finding(
        f"The static estimate understands {est.coverage:.0%} of the graph's operations; "
        f"unknown ops pass the signal through unchanged: {', '.join(est.unknown_ops)}.",
        Location(), evidence={"coverage": est.coverage,
                              "unknown_ops": ", ".join(est.unknown_ops)})]


FAMILY = RuleFamily(
    number=8,
    rules=(GS801, GS802),
    checks=(Check(("GS801",), check_tracer), Check(("GS802",), check_coverage)),
)
