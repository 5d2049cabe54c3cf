"""The checks: static estimate and probe measurements in, findings out.

Each check reads the analysis (graph, estimate, probe) and returns frozen
:class:`~gradscope.report.Finding` records whose rule metadata comes from the
registry. Checks never compute gradients themselves and never render.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradscope.report import Finding, Location, Recommendation, Severity
from gradscope.rules.registry import get_rule

if TYPE_CHECKING:
    from gradscope.estimate.propagate import StaticEstimate
    from gradscope.probe import ProbeResult
    from gradscope.tracing.graph import TracedModel


@dataclass(frozen=True)
class Thresholds:
    """Limits on the gradient ratio (earliest trainable layers / output), after pooling.

    Ratios are of gradient norms, discounting averaging ops (see
    ``gradscope.estimate.propagate``). Defaults follow SIGNAL_PROPAGATION.md:
    a plain stack whose product of gains leaves [1e-2, 1e2] needs attention.
    """

    vanishing_warning: float = 1e-2
    vanishing_error: float = 1e-3
    exploding_warning: float = 1e2
    exploding_error: float = 1e3
    min_coverage: float = 0.9


@dataclass
class Analysis:
    """Everything the checks may read."""

    traced: TracedModel
    estimate: StaticEstimate
    probe: ProbeResult | None
    thresholds: Thresholds


def _location(analysis: Analysis, node: str) -> Location:
    data = analysis.traced.graph.nodes[node]
    return Location(module=data["module"], node=node, file=data["file"], line=data["line"])


def _finding(code: str, message: str, location: Location, severity: Severity | None = None,
             recommendations: Iterable[Recommendation] = (),
             evidence: dict[str, float | int | str | None] | None = None) -> Finding:
    rule = get_rule(code)
    return Finding(rule=code, category=rule.category, severity=severity or rule.severity,
                   message=message, location=location,
                   recommendations=tuple(recommendations), evidence=evidence or {})


def trainable_nodes(analysis: Analysis) -> list[str]:
    """Nodes whose own weights train: where a starved gradient actually hurts."""
    graph = analysis.traced.graph
    return [n for n in analysis.traced.order()
            if graph.nodes[n]["role"] == "compute" and graph.nodes[n]["num_params"] > 0
            and graph.nodes[n]["is_float"]]


def entry_nodes(analysis: Analysis) -> list[str]:
    """The first trainable layers on each path from the inputs: where vanishing is judged.

    The gradient has to travel the whole depth to reach them. Side paths that are
    weak by design at initialisation (attention's query/key projections under a
    near-uniform softmax) are not entry layers, so they do not raise alarms.
    """
    graph = analysis.traced.graph
    trainable = set(trainable_nodes(analysis))
    behind: dict[str, bool] = {}
    entries = []
    for node in analysis.traced.order():
        preds = list(graph.predecessors(node))
        behind[node] = any(p in trainable or behind.get(p, False) for p in preds)
        if node in trainable and not behind[node]:
            entries.append(node)
    return entries


def _extreme(values: dict[str, float | None], nodes: list[str],
             ) -> tuple[str, float, str, float] | None:
    """(argmin, min, argmax, max) of finite values over ``nodes``."""
    finite = [(n, values[n]) for n in nodes if values.get(n) is not None
              and math.isfinite(values[n])]  # type: ignore[arg-type]
    if not finite:
        return None
    lo = min(finite, key=lambda item: item[1])  # type: ignore[arg-type,return-value]
    hi = max(finite, key=lambda item: item[1])  # type: ignore[arg-type,return-value]
    return lo[0], float(lo[1]), hi[0], float(hi[1])  # type: ignore[arg-type]


def probe_health(analysis: Analysis) -> dict[str, float | None]:
    """Measured gradient norm ratio per node, discounting averaging ops like the estimate."""
    if analysis.probe is None:
        return {}
    out: dict[str, float | None] = {}
    for node, sq in analysis.probe.sq_norm.items():
        structural = analysis.estimate.structural.get(node, 1.0) or 1.0
        out[node] = math.sqrt(sq / structural) if math.isfinite(sq) else None
    return out


def _op_of(analysis: Analysis, node: str) -> str:
    data = analysis.traced.graph.nodes[node]
    return f"{data['module'] or node} ({data['op']})"


def _activations(analysis: Analysis) -> set[str]:
    graph = analysis.traced.graph
    return {graph.nodes[n]["key"].split(":", 1)[1] for n in graph.nodes
            if graph.nodes[n]["key"].startswith("activation:")}


def _vanishing_fixes(analysis: Analysis) -> list[Recommendation]:
    acts = _activations(analysis)
    fixes = []
    if acts & {"sigmoid", "tanh", "softsign", "hardsigmoid"}:
        fixes.append(Recommendation(
            "activation",
            "Replace saturating hidden activations (sigmoid/tanh) with ReLU or GELU: "
            "E[sigmoid'(z)^2] is 0.045 at unit variance, so each layer keeps ~4.5% of the "
            "gradient's squared norm.",
            "nn.ReLU()  # instead of nn.Sigmoid() between hidden layers"))
    fixes.append(Recommendation(
        "initialization",
        "Initialise weights for the activation so each layer's gain is 1: Kaiming normal "
        "(fan_in) for ReLU-family activations (Var W = 2/fan_in), the critical sigma_w for tanh.",
        "for m in model.modules():\n"
        "    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):\n"
        "        nn.init.kaiming_normal_(m.weight, mode=\"fan_in\", nonlinearity=\"relu\")\n"
        "        if m.bias is not None:\n"
        "            nn.init.zeros_(m.bias)"))
    fixes.append(Recommendation(
        "residual_connection",
        "Add identity skips around the long plain stack (x = x + block(x)), so the gradient has "
        "a path that no layer attenuates.",
        "def forward(self, x):\n    return x + self.block(x)"))
    return fixes


def _exploding_fixes(analysis: Analysis, grad_norm: float | None) -> list[Recommendation]:
    fixes = []
    if grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0:
        max_norm = float(f"{grad_norm:.2g}")
        fixes.append(Recommendation(
            "gradient_clipping",
            f"Clip the global gradient norm at {max_norm:g} (the probe's measured norm; 0.5x to "
            "10x the typical norm is safe, Pascanu et al. 2013) while the cause is fixed.",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})"))
    fixes.append(Recommendation(
        "initialization",
        "Reduce the initial weight scale to the activation's critical value (Kaiming fan_in "
        "for ReLU, Var W = 2/fan_in).",
        "nn.init.kaiming_normal_(layer.weight, mode=\"fan_in\", nonlinearity=\"relu\")"))
    fixes.append(Recommendation(
        "normalization",
        "Put a normalisation layer (LayerNorm/BatchNorm) after each weight layer so the scale "
        "cannot compound with depth.",
        None))
    return fixes


def _gradient_extremes(analysis: Analysis, values: dict[str, float | None], *, measured: bool,
                       ) -> list[Finding]:
    t = analysis.thresholds
    nodes = entry_nodes(analysis)
    ext = _extreme(values, nodes)
    if ext is None:
        return []
    lo_node, lo, hi_node, hi = ext
    findings = []
    source = "measured" if measured else "predicted"
    code_v, code_e = ("GS102", "GS202") if measured else ("GS101", "GS201")
    if lo < t.vanishing_warning:
        severity: Severity = "error" if lo < t.vanishing_error else "warning"
        amount = "no gradient at all" if lo == 0 else f"{lo:.2e} of the gradient at the output"
        findings.append(_finding(
            code_v,
            f"Vanishing gradient ({source}): {_op_of(analysis, lo_node)} receives {amount} "
            f"(threshold {t.vanishing_warning:g}); its weights will barely train.",
            _location(analysis, lo_node), severity, _vanishing_fixes(analysis),
            {"gradient_ratio": lo, "threshold": t.vanishing_warning,
             "depth": analysis.traced.graph.nodes[lo_node]["depth"]}))
    if hi > t.exploding_warning:
        severity = "error" if hi > t.exploding_error else "warning"
        norm = None
        if analysis.probe is not None:
            norms = [v for v in analysis.probe.param_grad_norm.values()
                     if v is not None and math.isfinite(v)]
            norm = math.sqrt(sum(v * v for v in norms)) if norms else None
        findings.append(_finding(
            code_e,
            f"Exploding gradient ({source}): {_op_of(analysis, hi_node)} receives {hi:.2e} "
            f"times the gradient at the output (threshold {t.exploding_warning:g}).",
            _location(analysis, hi_node), severity, _exploding_fixes(analysis, norm),
            {"gradient_ratio": hi, "threshold": t.exploding_warning,
             "depth": analysis.traced.graph.nodes[hi_node]["depth"]}))
    return findings


def check_static_gradients(analysis: Analysis) -> list[Finding]:
    return _gradient_extremes(analysis, analysis.estimate.health, measured=False)


def _forget_bias_fix(module_path: str, steps: int) -> Recommendation:
    bias = 3.0 if steps >= 100 else 1.0
    return Recommendation(
        "initialization",
        f"Set the forget-gate bias to {bias:g} ({'>= 3 for 100+ steps' if bias == 3 else '>= 1'}"
        "): PyTorch's default is 0, and the forget gate then keeps only about half of the "
        "cell state's gradient per step.",
        f"lstm = model.get_submodule({module_path!r})\n"
        "hidden = lstm.hidden_size\n"
        "with torch.no_grad():\n"
        "    for name, bias in lstm.named_parameters():\n"
        "        if name.startswith(\"bias_ih\"):  # gate order: input, forget, cell, output\n"
        f"            bias[hidden:2 * hidden].fill_({bias:g})\n"
        "        elif name.startswith(\"bias_hh\"):\n"
        "            bias[hidden:2 * hidden].zero_()")


def check_recurrent(analysis: Analysis) -> list[Finding]:
    """GS103: the gradient through time, from the estimate's unroll of each RNN."""
    t = analysis.thresholds
    findings = []
    for node, result in sorted(analysis.estimate.recurrent.items()):
        steps = int(result.steps)
        if steps < 2 or not result.step_gain > 0:
            continue
        ratio = math.sqrt(result.step_gain) ** (steps - 1)
        if ratio >= t.vanishing_warning:
            continue
        severity: Severity = "error" if ratio < t.vanishing_error else "warning"
        graph = analysis.traced.graph
        module = graph.nodes[node]["module"] or node
        cls = graph.nodes[node]["op"]
        fixes = [_forget_bias_fix(module, steps)] if cls == "LSTM" else [Recommendation(
            "initialization",
            "Use an LSTM or GRU, or initialise the recurrent matrix orthogonally, so the "
            "per-step gain stays near 1.",
            f"for name, w in model.get_submodule({module!r}).named_parameters():\n"
            "    if name.startswith(\"weight_hh\"):\n"
            "        torch.nn.init.orthogonal_(w)")]
        findings.append(_finding(
            "GS103",
            f"Vanishing gradient through time (predicted): {module} ({cls}) keeps "
            f"{result.step_gain:.3g} of the gradient's squared norm per step, so after "
            f"{steps} steps the first one receives {ratio:.2e} of the last ({result.note}).",
            _location(analysis, node), severity, fixes,
            {"step_gain": result.step_gain, "steps": steps, "gradient_ratio": ratio,
             "threshold": t.vanishing_warning}))
    return findings


def check_measured_gradients(analysis: Analysis) -> list[Finding]:
    probe = analysis.probe
    if probe is None or probe.nonfinite_forward or probe.nonfinite_backward:
        return []  # meaningless once NaN has appeared; GS501/GS502 report that instead
    return _gradient_extremes(analysis, probe_health(analysis), measured=True)


def check_nonfinite(analysis: Analysis) -> list[Finding]:
    probe = analysis.probe
    if probe is None:
        return []
    findings = []
    if probe.nonfinite_forward:
        first = probe.nonfinite_forward[0]
        findings.append(_finding(
            "GS501",
            f"NaN/Inf first appears in the forward pass at {_op_of(analysis, first)}; "
            f"{len(probe.nonfinite_forward)} node(s) downstream are non-finite too.",
            _location(analysis, first),
            evidence={"first_node": first, "nonfinite_nodes": len(probe.nonfinite_forward)}))
    else:
        bad = [n for n in probe.nonfinite_backward]
        if bad:
            start = bad[-1]  # closest to the output in forward order: where backward breaks
            findings.append(_finding(
                "GS502",
                f"The gradient turns NaN/Inf at {_op_of(analysis, start)} although the forward "
                f"pass is finite; {len(bad)} node(s) upstream receive non-finite gradients.",
                _location(analysis, start),
                evidence={"first_node": start, "nonfinite_nodes": len(bad)}))
    return findings


def check_trace(analysis: Analysis) -> list[Finding]:
    traced = analysis.traced
    findings = []
    if traced.method != "symbolic_trace":
        failed = [a for a in traced.attempts if not a.ok]
        why = "; ".join(f"{a.method} failed: {a.message}" for a in failed)
        findings.append(_finding(
            "GS801",
            f"Graph recorded with {traced.method} ({why}).",
            Location(), evidence={"method": traced.method}))
    est = analysis.estimate
    if est.coverage < analysis.thresholds.min_coverage:
        findings.append(_finding(
            "GS802",
            f"The static estimate understands {est.coverage:.0%} of the graph's operations; "
            f"unknown ops pass the signal through unchanged: {', '.join(est.unknown_ops)}.",
            Location(), evidence={"coverage": est.coverage,
                                  "unknown_ops": ", ".join(est.unknown_ops)}))
    return findings


CHECKS: tuple[Callable[[Analysis], list[Finding]], ...] = (
    check_trace,
    check_nonfinite,
    check_static_gradients,
    check_recurrent,
    check_measured_gradients,
)


def run_checks(analysis: Analysis) -> list[Finding]:
    """All findings, most serious first, in a stable order."""
    from gradscope.report import severity_rank

    findings = [f for check in CHECKS for f in check(analysis)]
    return sorted(findings, key=lambda f: (severity_rank(f.severity), f.rule,
                                           f.location.node or ""))


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
    return [_finding(
        "GS601",
        f"Learning rate {probe.lr:g} with {probe.optimizer} is too {direction}: the median "
        f"layer's first update is {median:.1e} of its weight norm (healthy band "
        f"[{lo:g}, {hi:g}]).",
        _location(analysis, worst), None,
        [Recommendation("learning_rate",
                        f"Multiply the learning rate by {factor:.3g} (lr = {new_lr:.3g}) to bring "
                        f"the median update/weight ratio to {UPDATE_RATIO_TARGET:g}.",
                        f"optimizer = torch.optim.{_OPTIMIZERS.get(probe.optimizer or '', 'SGD')}"
                        f"(model.parameters(), lr={new_lr:.3g})"),
         Recommendation("warmup", "Warm the learning rate up linearly over the first 1000 "
                        "steps so early large updates cannot destroy the initialisation.",
                        "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, "
                        "start_factor=0.01, total_iters=1000)")],
        {"median_update_ratio": median, "lr": probe.lr, "factor": factor})]


CHECKS = (*CHECKS, check_learning_rate)
