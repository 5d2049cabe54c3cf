"""GS1xx, vanishing gradients: predicted, measured, through time, and per-layer updates.

GS101/GS102 judge the gradient ratio at the entry layers, from the health table
(``gradscope.rules.health``) that the report shows too; GS103 judges the
estimate's unroll of each recurrent layer; GS104 the measured ||grad W||/||W||
of each weight layer against the median layer's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.options import Thresholds
from gradscope.records import Finding, Location, Recommendation, Severity, severity_rank
from gradscope.rules.base import (
    GLOROT,
    HE,
    HE_RES,
    PASCANU,
    SCHOENHOLZ,
    Check,
    Rule,
    RuleFamily,
    location,
    median,
    normalised_downstream,
    op_of,
)
from gradscope.rules.optimizers import (
    ADAM_EPS,
    UPDATE_RATIO_BAND,
    adaptive,
    gradient_scale,
    scale_words,
)
from gradscope.steps import TrainingRecord, health, input_layer

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS101 = Rule(
    code="GS101",
    name="vanishing-gradient-predicted",
    category="vanishing_gradient",
    severity="error",
    summary="The static estimate predicts the gradient shrinks by orders of magnitude "
    "before it reaches the first layers.",
    what="From the weights' measured scales and the activations' derivative moments, "
    "the backward signal reaching the earliest trainable layers is predicted to be a "
    "small fraction of the signal at the output, after discounting pooling, averaging "
    "and width changes, which rescale the gradient without starving any layer.",
    why="Layers that receive almost no gradient barely move: the early layers stay at "
    "their initialisation while the late layers fit the data alone. The product of "
    "per-layer gains chi over a plain stack of depth L behaves as chi^L.",
    fix="Initialise for the activation (Kaiming fan_in for ReLU, the critical sigma_w "
    "for tanh), swap saturating activations (sigmoid) for ReLU-like ones, add residual "
    "connections around the long plain stack, or put normalisation in it.",
    references=(SCHOENHOLZ, GLOROT, HE),
)

GS102 = Rule(
    code="GS102",
    name="vanishing-gradient-measured",
    category="vanishing_gradient",
    severity="error",
    summary="The probe measured the gradient shrinking by orders of magnitude towards "
    "the first layers.",
    what="A real forward and backward pass on the target device measured the RMS of "
    "dLoss/d(activation) at every node; at the earliest trainable layers it is a small "
    "fraction of the RMS at the output, after discounting pooling, averaging and width "
    "changes.",
    why="Measured, not predicted: whatever the cause (initialisation, saturation, dead "
    "units), the early layers get too little gradient to learn.",
    fix="See the estimate's explanation of where the signal is lost; fix the "
    "initialisation or activation there, or add a residual connection around it.",
    references=(GLOROT, HE, HE_RES),
)

GS103 = Rule(
    code="GS103",
    name="vanishing-through-time",
    category="vanishing_gradient",
    severity="error",
    summary="A recurrent layer is predicted to lose the gradient over its unroll: early "
    "time steps get almost none.",
    what="The static estimate unrolls nn.LSTM/GRU/RNN over the sequence with the actual "
    "gate weights and biases; the gradient's squared norm shrinks by the step gain chi "
    "per step back in time, so the first step receives chi^(T-1) of what the last gets. "
    "An error when the gradient falls below the error threshold before it has gone back "
    "half the steps (most of the sequence cannot be learnt from); information, with the "
    "reach, when it goes further or when the loss reads every step: the shared weights "
    "still train on the recent steps, only long dependencies are slow to learn.",
    why="Long-range dependencies cannot be learned when their gradient is 1e-20 of the "
    "local one; LSTMs with PyTorch's default forget-gate bias 0 forget almost as fast as "
    "a vanilla RNN.",
    fix="For LSTMs set the forget-gate bias to 1 (3 or more for 100+ steps); for vanilla "
    "RNNs use an LSTM/GRU or an orthogonal recurrent matrix; shorten the unroll "
    "(truncated BPTT) if long memory is not needed.",
    references=(PASCANU,
                "Hochreiter & Schmidhuber 1997, Long Short-Term Memory",
                "Jozefowicz, Zaremba & Sutskever 2015, An Empirical Exploration of "
                "Recurrent Network Architectures"),
)

GS104 = Rule(
    code="GS104",
    name="update-imbalance-measured",
    category="vanishing_gradient",
    severity="warning",
    summary="Some layers' weight gradients are orders of magnitude smaller, relative to "
    "their weights, than the rest's: they will not train at the same learning rate.",
    what="For every trainable layer the probe measured ||grad W|| / ||W||, the relative "
    "step a plain SGD update takes. The smallest is far below the median layer's. "
    "Judged on the ratio, not on ||grad W|| alone: a layer with huge weights (or one "
    "followed by a normalisation) can show an ordinary gradient norm and still not move.",
    why="With one learning rate for all layers, a layer whose relative step is 1e-4 of the "
    "others' stays at its initialisation for the whole run.",
    fix="Rescale that layer's initialisation to match its neighbours' (a weight far larger "
    "than Kaiming's scale is the usual cause), or give it its own parameter group.",
    references=(HE, "You et al. 2017, Large Batch Training of Convolutional Networks "
                "(LARS: per-layer ||grad W|| / ||W||)"),
)


def vanishing_fixes(analysis: Analysis) -> list[Recommendation]:
    """Verified changes for a vanishing gradient: activation, init, skips, in that order."""

    def build() -> list[Recommendation]:
        fixer = analysis.fixer
        found = [fixer.activation_swap("low"), fixer.initialization("low"),
                 fixer.residual("low")]
        return [r for r in found if r is not None]

    return list(analysis.remember("vanishing_fixes", build))


def _vanishing(analysis: Analysis, measured: bool) -> list[Finding]:
    t = analysis.thresholds
    # Where the probe measured the layer, a prediction stands only as far as the
    # measurement confirms it (gradscope.rules.health: a measurement outranks).
    found = analysis.health.finding_at(low=True, measured=measured)
    if found is None:
        return []
    lo_node, lo, cls, evidence = found
    severity: Severity = "error" if cls == "bad" else "warning"
    rule = GS102 if measured else GS101
    source = "measured" if measured else "predicted"
    amount = "no gradient at all" if lo == 0 else f"{lo:.2e} of the gradient at the output"
    message = (f"Vanishing gradient ({source}): {op_of(analysis, lo_node)} receives {amount} "
               f"(threshold {t.vanishing_warning:g}); ")
    extra: dict[str, float | int | str | None] = {}
    if adaptive(analysis) and lo > 0:
        severity, judged, extra = _under_adam(analysis, lo_node, severity)
        message += judged
    else:
        message += "its weights will barely train" + (
            " with plain SGD, which the verdict assumes." if analysis.optimizer is None
            else ".")
        if severity == "warning":
            severity, judged, extra = _under_sgd(analysis, lo_node, severity)
            message += judged
    return [rule.finding(
        message, location(analysis, lo_node), severity, vanishing_fixes(analysis),
        {"gradient_ratio": lo, "threshold": t.vanishing_warning,
         "depth": analysis.traced.node(lo_node).depth, **evidence, **extra})]


def _under_adam(analysis: Analysis, node: str, severity: Severity,
                ) -> tuple[Severity, str, dict[str, float | int | str | None]]:
    """The vanishing verdict for an optimizer that rescales each element's step.

    Adam's step is lr-sized wherever the gradient is well above its eps, however small
    relative to the output: the entry layers train. Where their gradient RMS per element
    is below eps, the step is g / eps of lr and they do not (gradscope.rules.optimizers).
    Without a probe the absolute scale is unknown: a warning at most, saying so.
    """
    name = analysis.optimizer
    nodes = set(analysis.facts.entries) | {node}
    scale = gradient_scale(analysis, nodes)
    if scale is None:
        return (max(severity, "warning", key=severity_rank),  # the milder of the two
                f"{name} rescales a small gradient unless it is below its eps ({ADAM_EPS:g}); "
                "without the probe's measurement its absolute size is unknown.", {})
    where, rms = scale
    evidence: dict[str, float | int | str | None] = {"gradient_rms_per_element": rms,
                                                    "adam_eps": ADAM_EPS}
    layer = op_of(analysis, where)
    if rms < ADAM_EPS:
        return ("error",
                f"{layer}'s weight gradient is {rms:.2e} per element ({scale_words(analysis)}), "
                f"below {name}'s eps {ADAM_EPS:g}, so {name} cannot rescale it: its step there "
                f"is about {rms / ADAM_EPS:.2g} of the learning rate and those weights will "
                "barely train.", evidence)
    return ("info",
            f"under {name} this is rescaled: the first layers' weight gradient is {rms:.2e} "
            f"per element ({scale_words(analysis)}) at {layer}, above {name}'s eps "
            f"{ADAM_EPS:g}, so each element still steps by about the learning rate; with plain "
            "SGD these layers would barely train.", evidence)


def _under_sgd(analysis: Analysis, node: str, severity: Severity,
               ) -> tuple[Severity, str, dict[str, float | int | str | None]]:
    """A warning-level vanishing gradient under SGD, judged by the step it makes with --lr.

    SGD's step is lr x g: how far the first layers move follows from the gradient and the
    learning rate together. Where the probe measured their first update below the floor
    of the usual band of update/weight ratios (1e-4, CS231n) with the given rate, they
    barely move over the run, and the gradient's shortfall is an error; within the band
    the rate makes up for it and the warning stays.
    """
    probe = analysis.probe
    if probe is None or probe.lr is None:
        return severity, "", {}
    floor = UPDATE_RATIO_BAND[0]
    found: list[tuple[float, str]] = []
    for n in set(analysis.facts.entries) | {node}:
        value = probe.update_ratio.get(n)
        if value is not None:
            found.append((value, n))
    if not found:
        return severity, "", {}
    ratio, where = min(found)
    evidence: dict[str, float | int | str | None] = {"entry_update_ratio": ratio,
                                                    "update_ratio_floor": floor}
    if ratio >= floor:
        return severity, "", evidence
    steps = f" over the {analysis.steps} planned steps, at most {analysis.steps * ratio:.2g} " \
        "of their norm" if analysis.steps else ""
    return ("error",
            f" With lr {probe.lr:g}, {op_of(analysis, where)}'s first SGD step is {ratio:.1e} "
            f"of its weight norm, below the {floor:g} floor of the usual band: the first "
            f"layers barely move{steps}.", evidence)




def check_static_vanishing(analysis: Analysis) -> list[Finding]:
    return _vanishing(analysis, measured=False)


def check_measured_vanishing(analysis: Analysis) -> list[Finding]:
    if not analysis.health.measured_judged:
        return []  # no probe, or NaN appeared: GS501/GS502 report that instead
    return _vanishing(analysis, measured=True)


def reads_every_step(analysis: Analysis, node: str, steps: int) -> bool:
    """Whether the loss reads the recurrent layer's output at every time step.

    A language model or a tagger predicts at every step: each step's output gets a
    gradient of its own, and the decay through time only bounds how far back a
    dependency can be learned. A classifier that reads the last step (or a pooled
    state) gets all its gradient through time. Structurally: every node between the
    layer and the output keeps a dimension of the sequence's length, or one that is the
    steps times the batch (``output.view(-1, vocab)`` before the decoder, as PyTorch's
    word-language-model example does: 35 x 2 rows of 512 logits).
    """
    from networkx import descendants

    between = descendants(analysis.traced.graph, node) & analysis.facts.on_path
    if not between:
        return False
    own = analysis.traced.node(node).shape
    # The layer's other leading dimensions (the batch): merged with the steps by a view.
    others = [int(d) for d in own[:-1]] if own else []
    if steps in others:
        others.remove(steps)
    merged = {steps * d for d in others if d > 1}
    for name in between:
        rec = analysis.traced.node(name)
        if rec.role != "compute" or not rec.is_float:
            continue
        if rec.shape is None or not (steps in rec.shape or merged & set(rec.shape)):
            return False
    return True


def check_recurrent(analysis: Analysis) -> list[Finding]:
    """GS103: the gradient through time, from the estimate's unroll of each RNN."""
    t = analysis.thresholds
    findings = []
    for node, result in sorted(analysis.estimate.recurrent.items()):
        steps = int(result.steps)
        if steps < 2 or not result.step_gain > 0:
            continue
        per_step = math.sqrt(result.step_gain)
        ratio = per_step ** (steps - 1)
        if ratio >= t.vanishing_warning:
            continue
        # How far back the gradient still trains: the steps until it falls below the
        # error threshold. Unlike depth, time does not starve any weight: the recurrent
        # weights are shared by every step and the last steps always give them their
        # gradient, so the model trains whatever the decay; what is bounded is how far
        # back a dependency can be learnt (Bengio et al. 1994). Most of the unroll out of
        # reach is an error: the model cannot learn from most of what it is fed. A
        # gradient that still reaches most of the steps (a GRU over 16 tokens at default
        # init) is information: the horizon, for a task that needs the oldest steps.
        reach = (math.log(t.vanishing_error) / math.log(per_step)
                 if per_step < 1 else math.inf)
        severity: Severity = "error" if reach < (steps - 1) / 2 else "info"
        rec = analysis.traced.node(node)
        message = (f"Vanishing gradient through time (predicted): {rec.module or node} "
                   f"({rec.op}) keeps {result.step_gain:.3g} of the gradient's squared norm "
                   f"per step, so after {steps} steps the first one receives {ratio:.2e} of "
                   f"the last ({result.note}); the gradient stays above "
                   f"{t.vanishing_error:g} of the last step's for about {reach:.0f} of the "
                   f"{steps} steps" + (", less than half of them." if severity == "error"
                                       else "; a task that hinges on the oldest steps will "
                                       "learn them slowly."))
        evidence: dict[str, float | int | str | None] = {
            "step_gain": result.step_gain, "steps": steps, "gradient_ratio": ratio,
            "threshold": t.vanishing_warning, "reach_steps": reach}
        if reads_every_step(analysis, node, steps):
            # Every step gets its own gradient from the loss: nothing of the input is out
            # of reach of training, only the length of the dependencies is bounded.
            severity = "info"
            horizon = math.log(t.vanishing_warning) / math.log(per_step)
            message += (f" The loss reads every step, so each step gets a gradient of its "
                        f"own; dependencies longer than about {horizon:.0f} steps get less "
                        f"than {t.vanishing_warning:g} of it.")
            evidence["horizon_steps"] = horizon
        findings.append(GS103.finding(message, location(analysis, node), severity,
                                      analysis.fixer.recurrent(node), evidence))
    return findings


def scale_invariant(analysis: Analysis, node: str) -> bool:
    """Whether a normalisation's affine scale cannot change the loss at all.

    When every path from the layer reaches another normalisation through ops that
    pass a positive scale through (DenseNet's stem BatchNorm feeds only the
    BatchNorms of its dense layers), the next normalisation divides the scale out:
    its gradient is zero by construction, at every step, not starved.
    """
    traced = analysis.traced
    return traced.node(node).family == "normalisation" and normalised_downstream(traced, node)


def check_update_imbalance(analysis: Analysis) -> list[Finding]:
    """GS104: a layer's ||grad W||/||W|| far below the median layer's, measured."""
    probe = analysis.probe
    if probe is None or probe.nonfinite_forward or probe.nonfinite_backward:
        return []
    # A layer the loss cannot reach, one behind a zero-initialised layer (no gradient
    # until the first update, by design), or one that reaches the loss only through
    # attention scores (weak under a flat softmax, by design) is not "imbalanced".
    facts = analysis.facts
    on_path = facts.on_path - facts.behind_zero_init - facts.score_side
    ratios = {n: v for n, v in probe.param_grad_ratio.items()
              if v is not None and math.isfinite(v) and n in on_path
              and not scale_invariant(analysis, n)}
    if len(ratios) < 2:
        return []
    typical_ratio = median(list(ratios.values()))
    if typical_ratio <= 0:
        return []
    node = min(ratios, key=lambda n: (ratios[n], analysis.traced.node(n).index))
    relative = ratios[node] / typical_ratio
    t = analysis.thresholds
    if relative >= t.update_imbalance:
        return []
    norm = probe.param_grad_norm.get(node)
    norms = [v for n, v in probe.param_grad_norm.items()
             if v is not None and v > 0 and n in on_path]
    typical = median(norms) if norms else None
    detail = ""
    if norm is not None and typical:
        share = norm / typical
        detail = (f"; its ||grad W|| alone ({share:.2g}x the median layer's) would not show it"
                  if 0.1 <= share <= 10 else f"; ||grad W|| alone: {share:.2g}x the median")
    severity: Severity = "error" if relative < t.update_imbalance ** 2 else "warning"
    evidence: dict[str, float | int | str | None] = {
        "param_grad_ratio": ratios[node], "median_param_grad_ratio": typical_ratio,
        "relative": relative, "threshold": t.update_imbalance}
    adam = ""
    rms = probe.param_grad_rms.get(node)
    if adaptive(analysis) and rms is not None:
        # Adam steps each element by about lr whatever the gradient's size, unless the
        # gradient is below its eps: an imbalance of gradients is then no imbalance of steps.
        evidence.update({"gradient_rms_per_element": rms, "adam_eps": ADAM_EPS})
        if rms >= ADAM_EPS:
            severity = "info"
            adam = (f" Under {analysis.optimizer} the steps are not imbalanced: its gradient is "
                    f"{rms:.2e} per element, above eps {ADAM_EPS:g}, so it steps by about the "
                    "learning rate like the rest.")
        else:
            severity = "error"
            adam = (f" Its gradient is {rms:.2e} per element, below {analysis.optimizer}'s eps "
                    f"{ADAM_EPS:g}: even {analysis.optimizer} steps it by only about "
                    f"{rms / ADAM_EPS:.2g} of the learning rate.")
    return [GS104.finding(
        f"{op_of(analysis, node)}: ||grad W||/||W|| = {ratios[node]:.2e}, {relative:.1e} of "
        f"the median layer's ({typical_ratio:.2e}){detail}.{adam}",
        location(analysis, node), severity, [], evidence)]


GS105 = Rule(
    code="GS105",
    name="gradient-collapse-in-training",
    category="vanishing_gradient",
    severity="warning",
    summary="During training, the gradient reaching some layer fell by an order of magnitude.",
    what="Watching the first steps of a training run (gradscope.watch): among the "
    "trainable layers whose gradient health (RMS of dLoss/d(layer output) over the "
    "output's) was at least the vanishing warning threshold (1e-2) at step 0, the "
    "smallest figure at the last recorded step is at most a tenth of the smallest at "
    "step 0. Layers small by design from the start (attention's query and key "
    "projections) are not among them.",
    why="The updates themselves are pushing the network into a regime where the gradient "
    "no longer reaches its early layers (units dying behind a normalisation, saturating "
    "pre-activations, a residual stream dwarfing its branches): the layers that still "
    "need to learn stop receiving a signal, although the network looked healthy at "
    "initialisation.",
    fix="Lower the learning rate or warm it up, so the first updates do not push the "
    "pre-activations into dead or flat regions; prefer a Pre-LN/residual layout or "
    "normalisation before the nonlinearity; check the finding's layer for dead units "
    "(GS403).",
    references=(PASCANU, HE),
)

#: An order of magnitude: the floor of the healthy layers, last recorded step against step 0.
COLLAPSE_FACTOR = 0.1


def check_step_collapse(record: TrainingRecord) -> list[Finding]:
    if len(record.recorded) < 2:
        return []
    healthy = Thresholds().vanishing_warning
    pairs = [(name, health(record, 0, name), health(record, -1, name))
             for name in record.trainable]
    # The floor of the layers that were healthy at step 0, then and now: one layer's fall
    # from an unusually large start to a normal level is not the gradient stopping.
    kept = [(n, a, b) for n, a, b in pairs if a is not None and b is not None and a >= healthy]
    if not kept:
        return []
    first = min(kept, key=lambda item: item[1])
    name, _, end = min(kept, key=lambda item: item[2])
    start = first[1]
    ratio = end / start
    if ratio > COLLAPSE_FACTOR:
        return []
    step = record.recorded[-1].step
    return [GS105.finding(
        f"By step {step} {name} receives {end:.2g} of the output's gradient (RMS), "
        f"{ratio:.2g} times the smallest figure among the layers healthy at step 0 "
        f"({first[0]}: {start:.2g}): the gradient stopped reaching it during training.",
        Location(module=name),
        evidence={"step": step, "health": end, "health_step0": start, "ratio": ratio,
                  "layer_step0": first[0]})]


GS106 = Rule(
    code="GS106",
    name="vanishing-in-training",
    category="vanishing_gradient",
    severity="warning",
    summary="During training, some layer's gradient stayed below the vanishing threshold.",
    what="Watching the first steps of a training run (gradscope.watch): at every recorded "
    "step, the gradient health (RMS of dLoss/d(layer output) over the output's) of the "
    "trainable layer nearest the input, the first to run in the forward pass, is below "
    "the vanishing error threshold (1e-3 by default, the one GS101/GS102 judge with).",
    why="The before-training verdict under Adam is information only, because Adam "
    "rescales each parameter's step; measured over real steps, a gradient that stays "
    "this small is mostly noise, and the layers behind it do not learn what the output "
    "needs.",
    fix="The fixes of GS101/GS102 for that layer: a residual connection around the "
    "stack, an activation that does not saturate (ReLU/GELU instead of sigmoid), "
    "normalisation, or an initialisation that keeps the scale (He/Xavier).",
    references=(GLOROT, HE),
)


def check_step_vanishing(record: TrainingRecord) -> list[Finding]:
    name = input_layer(record)
    if name is None:
        return []
    threshold = Thresholds().vanishing_error
    figures = [health(record, i, name) for i in range(len(record.recorded))]
    if any(v is None or v >= threshold for v in figures):
        return []
    known = [v for v in figures if v is not None]
    return [GS106.finding(
        f"At each of the {len(figures)} recorded steps the layer nearest the input, {name}, "
        f"received less than {threshold:.0e} of the output's gradient (RMS; at most "
        f"{max(known):.2g}, {known[-1]:.2g} at step {record.recorded[-1].step}).",
        Location(module=name),
        evidence={"steps": len(figures), "health": known[-1], "health_max": max(known),
                  "threshold": threshold})]


FAMILY = RuleFamily(
    number=1,
    rules=(GS101, GS102, GS103, GS104, GS105, GS106),
    step_checks=(Check(("GS105",), check_step_collapse),
                 Check(("GS106",), check_step_vanishing)),
    checks=(Check(("GS101",), check_static_vanishing),
            Check(("GS102",), check_measured_vanishing),
            Check(("GS103",), check_recurrent),
            Check(("GS104",), check_update_imbalance)),
)
