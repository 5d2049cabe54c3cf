"""The checks: static estimate and probe measurements in, findings out.

Each check reads the analysis (graph, estimate, probe) and returns frozen
:class:`~gradscope.report.Finding` records whose rule metadata comes from the
registry. Checks never compute gradients themselves and never render.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradscope.options import Thresholds
from gradscope.report import Finding, Location, Recommendation, Severity
from gradscope.rules.registry import get_rule
from gradscope.tracing.graph import node_record

if TYPE_CHECKING:
    from gradscope.estimate.engine import StaticEstimate
    from gradscope.probe import ProbeResult
    from gradscope.tracing.graph import TracedModel


@dataclass
class Analysis:
    """Everything the checks may read."""

    traced: TracedModel
    estimate: StaticEstimate
    probe: ProbeResult | None
    thresholds: Thresholds
    #: What the estimate ran on (fixes are re-estimated on the same inputs).
    inputs: tuple[Any, ...] = ()
    declared: dict[int, tuple[float, float]] | None = None
    #: Results shared between checks (verified fixes are costly: one estimate each).
    memo: dict[str, Any] = field(default_factory=dict)

    def remember(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


def _location(analysis: Analysis, node: str) -> Location:
    data = node_record(analysis.traced.graph, node)
    return Location(module=data.module, node=node, file=data.file, line=data.line)


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
            if node_record(graph, n).role == "compute" and node_record(graph, n).num_params > 0
            and node_record(graph, n).is_float]


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
    data = node_record(analysis.traced.graph, node)
    return data.label()


def _activations(analysis: Analysis) -> set[str]:
    graph = analysis.traced.graph
    return {node_record(graph, n).key.split(":", 1)[1] for n in graph.nodes
            if node_record(graph, n).key.startswith("activation:")}


def _vanishing_fixes(analysis: Analysis) -> list[Recommendation]:
    """Verified changes for a vanishing gradient: activation, init, skips, in that order."""
    from gradscope.rules.recommend import Fixer

    def build() -> list[Recommendation]:
        fixer = Fixer(analysis)
        found = [fixer.activation_swap("low"), fixer.initialization("low"),
                 fixer.residual("low")]
        return [r for r in found if r is not None]

    return list(analysis.remember("vanishing_fixes", build))


def global_grad_norm(analysis: Analysis) -> float | None:
    """The probe's global gradient norm over every measured weight (a typical batch)."""
    if analysis.probe is None:
        return None
    norms = [v for v in analysis.probe.param_grad_norm.values()
             if v is not None and math.isfinite(v)]
    return math.sqrt(sum(v * v for v in norms)) if norms else None


def healthy_clip_norm(analysis: Analysis) -> tuple[float, float, int] | None:
    """(sqrt(L) x g_out, g_out, L): the global norm if every layer had the output layers' norm.

    g_out is the median ||grad W|| over the quarter of trainable layers nearest
    the output, which an exploding or vanishing stack below them does not
    change. A global norm far above sqrt(L) g_out comes from the layers that
    explode, and is what the clip should cut.
    """
    probe = analysis.probe
    if probe is None:
        return None
    norms = [probe.param_grad_norm[n] for n in analysis.traced.order()
             if probe.param_grad_norm.get(n) is not None]
    values = [v for v in norms if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return None
    tail = sorted(values[-max(1, len(values) // 4):])
    g_out = tail[len(tail) // 2]
    return math.sqrt(len(values)) * g_out, g_out, len(values)


def clipping_fixes(analysis: Analysis, grad_norm: float | None) -> list[Recommendation]:
    """clip_grad_norm_ at a norm derived from the probe, and adaptive clipping for large batches.

    The threshold is the global norm the network would have if each of its L
    layers had the gradient norm its output layers measured
    (:func:`healthy_clip_norm`), rounded to 2 significant digits: it leaves a
    healthy step alone and cuts what the exploding layers add (Pascanu et al.
    2013 clip at the typical norm). AGC
    (Brock et al. 2021) clips each unit at lambda * ||W||; lambda = 0.01 is
    their value for batch 4096, and the probe's median ||grad W||/||W|| says
    how much of the network it would clip at this initialisation.
    """
    fixes = []
    reference = healthy_clip_norm(analysis)
    if grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0:
        if reference is not None:
            max_norm = float(f"{reference[0]:.2g}")
            why = (f"{reference[2]} layers at the {reference[1]:.2g} the layers nearest the "
                   f"output measured, sqrt({reference[2]}) x {reference[1]:.2g}; the probe "
                   f"measured {grad_norm:.2g} in all")
        else:
            max_norm = float(f"{grad_norm:.2g}")
            why = "the global norm the probe measured"
        fixes.append(Recommendation(
            "gradient_clipping",
            f"Clip the global gradient norm at {max_norm:g} ({why}; Pascanu et al. 2013) "
            "while the cause is fixed.",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})"))
    ratios = sorted(v for v in (analysis.probe.param_grad_ratio.values() if analysis.probe
                                else ()) if v is not None and math.isfinite(v) and v > 0)
    if ratios:
        lam = 0.01
        median = ratios[len(ratios) // 2]
        share = sum(1 for v in ratios if v > lam) / len(ratios)
        fixes.append(Recommendation(
            "gradient_clipping",
            f"For large batches (1024+), adaptive gradient clipping with lambda = {lam:g} "
            f"(Brock et al. 2021) clips each unit's gradient at {lam:g} x its weight norm: at "
            f"this initialisation the median layer's ||grad W||/||W|| is {median:.2g}, so "
            f"{share:.0%} of the layers would be clipped.",
            "def adaptive_clip_(parameters, clipping: float = "
            f"{lam:g}, eps: float = 1e-3) -> None:\n"
            "    for p in parameters:\n"
            "        if p.grad is None or p.dim() < 2:\n"
            "            continue\n"
            "        dims = tuple(range(1, p.dim()))\n"
            "        w = p.detach().norm(dim=dims, keepdim=True).clamp_min(eps)\n"
            "        g = p.grad.detach().norm(dim=dims, keepdim=True)\n"
            "        p.grad.mul_(torch.where(g > clipping * w, clipping * w / g.clamp_min(1e-6), "
            "1.0))"))
    return fixes


def _exploding_fixes(analysis: Analysis, grad_norm: float | None) -> list[Recommendation]:
    from gradscope.rules.recommend import Fixer

    def build() -> list[Recommendation]:
        fixer = Fixer(analysis)
        found = [fixer.initialization("high"), fixer.normalization_after_layers("high")]
        return [r for r in found if r is not None]

    return clipping_fixes(analysis, grad_norm) + list(analysis.remember("exploding_fixes", build))


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
             "depth": node_record(analysis.traced.graph, lo_node).depth}))
    if hi > t.exploding_warning:
        severity = "error" if hi > t.exploding_error else "warning"
        norm = global_grad_norm(analysis)
        findings.append(_finding(
            code_e,
            f"Exploding gradient ({source}): {_op_of(analysis, hi_node)} receives {hi:.2e} "
            f"times the gradient at the output (threshold {t.exploding_warning:g}).",
            _location(analysis, hi_node), severity, _exploding_fixes(analysis, norm),
            {"gradient_ratio": hi, "threshold": t.exploding_warning,
             "depth": node_record(analysis.traced.graph, hi_node).depth}))
    return findings


def check_static_gradients(analysis: Analysis) -> list[Finding]:
    return _gradient_extremes(analysis, analysis.estimate.health, measured=False)


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
        module = node_record(graph, node).module or node
        cls = node_record(graph, node).op
        from gradscope.rules.architecture import recurrent_fixes

        fixes = recurrent_fixes(analysis, node)
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
            f"{len(probe.nonfinite_forward) - 1} node(s) downstream are non-finite too.",
            _location(analysis, first),
            evidence={"first_node": first, "nonfinite_nodes": len(probe.nonfinite_forward)}))
    else:
        bad = [n for n in probe.nonfinite_backward]
        if bad:
            start = bad[-1]  # closest to the output in forward order: where backward breaks
            op = _backward_source(analysis, start, set(bad))
            where = (f"in the backward of {_op_of(analysis, op)}: its input "
                     f"{_op_of(analysis, start)} receives a non-finite gradient"
                     if op != start else f"at {_op_of(analysis, start)}")
            findings.append(_finding(
                "GS502",
                f"The gradient turns NaN/Inf {where} although the forward pass is finite; "
                f"{len(bad)} node(s) upstream receive non-finite gradients.",
                _location(analysis, op),
                evidence={"first_node": start, "op_node": op, "nonfinite_nodes": len(bad)}))
    return findings


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
                 if s not in bad and node_record(graph, s).role == "compute"]
    if not consumers:
        return node
    return min(consumers, key=lambda s: (not math.isfinite(sq.get(s, math.nan)),
                                         node_record(graph, s).index))


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
    from gradscope.rules.architecture import ARCHITECTURE_CHECKS

    findings = [f for check in (*CHECKS, *ARCHITECTURE_CHECKS) for f in check(analysis)]
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
        module = node_record(analysis.traced.graph, node).module or node
        findings.append(_finding(
            "GS602",
            f"{_op_of(analysis, node)}: first update is {ratio:.1e} of its weight norm with lr "
            f"{probe.lr:g} (band [{lo:g}, {hi:g}]; median layer {median:.1e}).",
            _location(analysis, node), None,
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


def check_update_imbalance(analysis: Analysis) -> list[Finding]:
    """GS104: a layer's ||grad W||/||W|| far below the median layer's, measured."""
    probe = analysis.probe
    if probe is None or probe.nonfinite_forward or probe.nonfinite_backward:
        return []
    ratios = {n: v for n, v in probe.param_grad_ratio.items()
              if v is not None and math.isfinite(v)}
    if len(ratios) < 2:
        return []
    values = sorted(ratios.values())
    median = values[len(values) // 2]
    if median <= 0:
        return []
    node = min(ratios, key=lambda n: (ratios[n], node_record(analysis.traced.graph, n).index))
    relative = ratios[node] / median
    t = analysis.thresholds
    if relative >= t.update_imbalance:
        return []
    norm = probe.param_grad_norm.get(node)
    norms = sorted(v for v in probe.param_grad_norm.values() if v is not None and v > 0)
    typical = norms[len(norms) // 2] if norms else None
    detail = ""
    if norm is not None and typical:
        share = norm / typical
        detail = (f"; its ||grad W|| alone ({share:.2g}x the median layer's) would not show it"
                  if 0.1 <= share <= 10 else f"; ||grad W|| alone: {share:.2g}x the median")
    severity: Severity = "error" if relative < t.update_imbalance ** 2 else "warning"
    return [_finding(
        "GS104",
        f"{_op_of(analysis, node)}: ||grad W||/||W|| = {ratios[node]:.2e}, {relative:.1e} of "
        f"the median layer's ({median:.2e}){detail}.",
        _location(analysis, node), severity, [],
        {"param_grad_ratio": ratios[node], "median_param_grad_ratio": median,
         "relative": relative, "threshold": t.update_imbalance})]


#: |z| beyond which a saturating activation's derivative is below 1% of its maximum.
SATURATION_EDGE = {"sigmoid": 5.986, "tanh": 2.993, "hardtanh": 1.0, "hardsigmoid": 3.0,
                   "softsign": 9.0}


def _tail_share(mean: float, var: float, edge: float) -> float:
    sd = math.sqrt(max(var, 1e-30))
    upper = 0.5 * math.erfc((edge - mean) / (sd * math.sqrt(2)))
    lower = 0.5 * math.erfc((edge + mean) / (sd * math.sqrt(2)))
    return upper + lower


def check_saturation(analysis: Analysis) -> list[Finding]:
    """GS301 (predicted, from the pre-activation moments) and GS302 (measured)."""
    from gradscope.estimate.statistics import var_of

    t = analysis.thresholds
    graph = analysis.traced.graph
    findings = []
    worst_static: tuple[str, float] | None = None
    for node in analysis.traced.order():
        key = node_record(graph, node).key
        name = key.split(":", 1)[1] if key.startswith("activation:") else None
        if name not in SATURATION_EDGE:
            continue
        ins = [r for r in node_record(graph, node).inputs if node_record(graph, r).role != "param"]
        mom = analysis.estimate.moments.get(ins[0]) if ins else None
        if mom is None:
            continue
        share = _tail_share(mom[0], var_of(mom), SATURATION_EDGE[name])
        if share >= t.saturated_fraction and (worst_static is None or share > worst_static[1]):
            worst_static = (node, share)
    if worst_static is not None:
        node, share = worst_static
        findings.append(_finding(
            "GS301",
            f"{_op_of(analysis, node)}: {share:.0%} of its outputs are predicted in the flat "
            f"tails (derivative < 1% of max; threshold {t.saturated_fraction:.0%}).",
            _location(analysis, node), "error" if share >= 0.5 else "warning",
            _saturation_fixes(analysis), {"saturated_fraction": share,
                                          "threshold": t.saturated_fraction}))
    probe = analysis.probe
    if probe is not None and probe.saturated_fraction:
        node = max(probe.saturated_fraction,
                   key=lambda n: (probe.saturated_fraction[n] or 0.0, -node_record(graph, n).index))
        share = probe.saturated_fraction[node] or 0.0
        if share >= t.saturated_fraction:
            findings.append(_finding(
                "GS302",
                f"{_op_of(analysis, node)}: {share:.0%} of its outputs were saturated on the "
                f"probe batches (derivative < 1% of max; threshold {t.saturated_fraction:.0%}).",
                _location(analysis, node), "error" if share >= 0.5 else "warning",
                _saturation_fixes(analysis), {"saturated_fraction": share,
                                              "threshold": t.saturated_fraction}))
    return findings


def _saturation_fixes(analysis: Analysis) -> list[Recommendation]:
    from gradscope.rules.recommend import Fixer

    def build() -> list[Recommendation]:
        fixer = Fixer(analysis)
        found = [fixer.initialization("low"), fixer.activation_swap("low")]
        return [r for r in found if r is not None]

    return list(analysis.remember("saturation_fixes", build))


def check_dead_units(analysis: Analysis) -> list[Finding]:
    """GS401: the first layer (forward order) with many units dead on every probe sample."""
    probe = analysis.probe
    if probe is None or probe.nonfinite_forward:
        return []
    t = analysis.thresholds
    graph = analysis.traced.graph
    dead = {n: v for n, v in probe.dead_fraction.items() if v is not None}
    bad = [n for n in analysis.traced.order() if dead.get(n, 0.0) >= t.dead_fraction]
    if not bad:
        return []
    first = bad[0]
    worst = max(dead[n] for n in bad)
    all_dead = [n for n in bad if dead[n] >= 1.0]
    severity: Severity = "error" if all_dead else "warning"
    message = (f"{_op_of(analysis, first)}: {dead[first]:.0%} of its units never activated on "
               f"any probe sample; {len(bad)} layer(s) at or above {t.dead_fraction:.0%}")
    if all_dead:
        message += (f", {len(all_dead)} entirely dead (first: "
                    f"{node_record(graph, all_dead[0]).module or all_dead[0]}): no gradient "
                    "reaches any layer below them")
    from gradscope.rules.recommend import Fixer

    fixer = Fixer(analysis)
    biased = negative_bias_layers(analysis)
    fixes = [r for r in (fixer.zero_bias([n for n, _ in biased]) if biased else None,
                         fixer.initialization("low")) if r is not None]
    return [_finding("GS401", message + ".", _location(analysis, first), severity, fixes,
                     {"dead_fraction": dead[first], "worst_dead_fraction": worst,
                      "dead_layers": len(bad), "threshold": t.dead_fraction})]


def negative_bias_layers(analysis: Analysis) -> list[tuple[str, float]]:
    """Weight layers feeding a ReLU whose bias mean is below -k pre-activation stds."""
    from gradscope.estimate.statistics import tensor_stats, var_of
    from gradscope.fixes import weight_and_bias, weight_layers

    graph = analysis.traced.graph
    found = []
    for node in weight_layers(analysis.traced):
        succ = list(graph.successors(node))
        if not any(node_record(graph, s).key in ("activation:relu", "activation:relu6")
                   for s in succ):
            continue
        _, bias = weight_and_bias(analysis.traced, node)
        mom = analysis.estimate.moments.get(node)
        if bias is None or mom is None:
            continue
        stats = tensor_stats(bias)
        if stats is None:
            continue
        # An input that is already all zero leaves only the bias: any negative bias
        # then switches every unit off (score capped at -10 std).
        sd = math.sqrt(max(var_of(mom), 0.0))
        score = max(stats[0] / sd, -10.0) if sd > 1e-12 else (-10.0 if stats[0] < 0 else 0.0)
        if score < -analysis.thresholds.negative_bias:
            found.append((node, score))
    return found


def check_negative_bias(analysis: Analysis) -> list[Finding]:
    """GS402: strongly negative biases before ReLUs (static)."""
    found = negative_bias_layers(analysis)
    if not found:
        return []
    from gradscope.rules.recommend import Fixer

    node, score = min(found, key=lambda item: item[1])
    off = 0.5 * math.erfc(score / math.sqrt(2))  # P(z < 0) for z ~ N(score, 1)
    fix = Fixer(analysis).zero_bias([n for n, _ in found])
    return [_finding(
        "GS402",
        f"{len(found)} layer(s) before a ReLU have a bias mean below "
        f"-{analysis.thresholds.negative_bias:g} pre-activation std; worst "
        f"{_op_of(analysis, node)} at {score:.2f} std"
        f"{' or below (its input is already zero)' if score <= -10 else ''}: about {off:.0%} "
        "of its units are off on a typical sample.",
        _location(analysis, node), None, [fix] if fix else [],
        {"bias_in_std": score, "layers": len(found), "off_fraction": off})]


CHECKS = (*CHECKS, check_learning_rate, check_layer_learning_rates, check_update_imbalance,
          check_saturation, check_dead_units, check_negative_bias)
