"""GS2xx, exploding gradients: predicted and measured, with clipping thresholds from the probe.

Judged at the entry layers from the health table (``gradscope.rules.health``),
like the vanishing family; the fixes add clipping figures measured by the probe
to the verified model changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.records import Finding, Recommendation, Severity
from gradscope.rules.base import (
    PASCANU,
    SCHOENHOLZ,
    Check,
    Rule,
    RuleFamily,
    location,
    op_of,
)
from gradscope.rules.optimizers import adaptive
from gradscope.steps import EDGE, TrainingRecord, loss_start, start_norm

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

GS201 = Rule(
    code="GS201",
    name="exploding-gradient-predicted",
    category="exploding_gradient",
    severity="error",
    summary="The static estimate predicts the gradient grows by orders of magnitude "
    "towards the first layers.",
    what="The per-layer backward gains multiply to a large factor between the output "
    "and the earliest trainable layers.",
    why="Early layers then take steps far larger than late ones: training diverges or "
    "needs a learning rate so small that the rest of the network stalls.",
    fix="Reduce the initial weight scale (Kaiming fan_in for ReLU; for tanh stay at the "
    "critical sigma_w rather than above it), normalise, and clip the gradient norm "
    "while the cause is fixed.",
    references=(SCHOENHOLZ, PASCANU),
)

GS202 = Rule(
    code="GS202",
    name="exploding-gradient-measured",
    category="exploding_gradient",
    severity="error",
    summary="The probe measured the gradient growing by orders of magnitude towards the "
    "first layers.",
    what="The measured RMS of dLoss/d(activation) at the earliest trainable layers is "
    "many times the RMS at the output, after discounting pooling and width changes.",
    why="Exploding gradients make the first optimiser steps destroy the early layers; "
    "losses turn to NaN within a few steps.",
    fix="Clip the global gradient norm (threshold from the probe), lower the initial "
    "weight scale, and add normalisation.",
    references=(PASCANU,),
)


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
    """clip_grad_norm_ at a norm derived from the probe.

    The threshold is the global norm the network would have if each of its L
    layers had the gradient norm its output layers measured
    (:func:`healthy_clip_norm`), rounded to 2 significant digits: it leaves a
    healthy step alone and cuts what the exploding layers add (Pascanu et al.
    2013 clip at the typical norm). It is offered only where it is below the
    global norm of some probe batch, with the share it clips: a threshold above
    every measured norm cuts nothing. Adaptive gradient clipping (Brock et al.
    2021) is not offered: its lambda depends on the training batch size, which the
    analysis does not know, and nothing here could verify it.
    """
    fixes = []
    reference = healthy_clip_norm(analysis)
    batches = list(analysis.probe.batch_grad_norms) if analysis.probe is not None else []
    if grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0 \
            and reference is not None and batches:
        # A threshold is advice only if it cuts the steps it is meant to cut: below the
        # norms the probe measured (one at 4.5e9 against a measured 2.9e9 clipped nothing).
        max_norm = float(f"{reference[0]:.2g}")
        clipped = sum(1 for v in batches if v > max_norm)
        if clipped:
            why = (f"{reference[2]} layers at the {reference[1]:.2g} the layers nearest the "
                   f"output measured, sqrt({reference[2]}) x {reference[1]:.2g}; the probe's "
                   f"global norm was {min(batches):.2g} to {max(batches):.2g} over "
                   f"{len(batches)} batches, so it clips {clipped} of {len(batches)}")
            fixes.append(Recommendation(
                "gradient_clipping",
                f"Clip the global gradient norm at {max_norm:g} ({why}; Pascanu et al. 2013) "
                "while the cause is fixed.",
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})",
                action={"op": "clip_grad_norm", "max_norm": max_norm}))
    return fixes


def exploding_fixes(analysis: Analysis, grad_norm: float | None) -> list[Recommendation]:
    """Clipping at measured figures, then verified re-initialisation and normalisation."""

    def build() -> list[Recommendation]:
        fixer = analysis.fixer
        found = [fixer.initialization("high"), fixer.normalization_after_layers("high")]
        return [r for r in found if r is not None]

    return clipping_fixes(analysis, grad_norm) + list(analysis.remember("exploding_fixes", build))


def _exploding(analysis: Analysis, measured: bool) -> list[Finding]:
    t = analysis.thresholds
    # A measurement outranks the prediction at the same layer (gradscope.rules.health).
    found = analysis.health.finding_at(low=False, measured=measured)
    if found is None:
        return []
    hi_node, hi, cls, evidence = found
    severity: Severity = "error" if cls == "bad" else "warning"
    rule = GS202 if measured else GS201
    source = "measured" if measured else "predicted"
    norm = global_grad_norm(analysis)
    adam = ""
    if adaptive(analysis):
        # Adam's step is bounded by about lr per element whatever the gradient's size
        # (Kingma & Ba 2015, sec. 2.1): a large gradient is not a large step. Non-finite
        # values, which Adam cannot rescale, are GS5xx's.
        severity = "info"
        adam = (f" Under {analysis.optimizer} each element's step is bounded by about the "
                "learning rate whatever the gradient's size, so this does not make large "
                "steps; with plain SGD it would.")
    return [rule.finding(
        f"Exploding gradient ({source}): {op_of(analysis, hi_node)} receives {hi:.2e} "
        f"times the gradient at the output (threshold {t.exploding_warning:g}).{adam}",
        location(analysis, hi_node), severity, exploding_fixes(analysis, norm),
        {"gradient_ratio": hi, "threshold": t.exploding_warning,
         "depth": analysis.traced.node(hi_node).depth, **evidence})]


def check_static_exploding(analysis: Analysis) -> list[Finding]:
    return _exploding(analysis, measured=False)


def check_measured_exploding(analysis: Analysis) -> list[Finding]:
    if not analysis.health.measured_judged:
        return []
    return _exploding(analysis, measured=True)


GS203 = Rule(
    code="GS203",
    name="gradient-growth-in-training",
    category="exploding_gradient",
    severity="warning",
    summary="During training, the gradient norm grew a hundredfold while the loss did not fall.",
    what="Watching the first steps of a training run (gradscope.watch): the total gradient "
    "norm over the parameters reached at least 100 times its median over the first five "
    "steps, at a step whose loss is not below the first five steps' mean.",
    why="A gradient that grows while the loss does not improve is the optimiser feeding "
    "on its own updates (the step overshoots, the next gradient is larger): the run is "
    "on its way to a loss spike or NaN (GS503). A gradient that grows while the loss "
    "falls is a network leaving a small-logit start, and is not reported.",
    fix="Clip the gradient norm at about the median of the first steps' norms "
    "(torch.nn.utils.clip_grad_norm_), lower the learning rate or add a warmup.",
    references=(PASCANU,),
)

#: Two orders of magnitude above the first steps' median norm.
GROWTH_FACTOR = 100.0


def check_step_growth(record: TrainingRecord) -> list[Finding]:
    end = record.first_nonfinite_step if record.first_nonfinite_step is not None \
        else len(record.grad_norms)
    norms = [(i, v) for i, v in enumerate(record.grad_norms[:end])
             if v is not None and math.isfinite(v)]
    losses = dict(record.finite_losses())
    start, base = start_norm(record), loss_start(record)
    if start is None or base is None or len(norms) <= EDGE:
        return []
    grown = [(i, v) for i, v in norms[EDGE:] if start > 0 and v >= GROWTH_FACTOR * start
             and i in losses and losses[i] >= base]
    if not grown:
        return []
    step, peak = max(grown, key=lambda item: item[1])
    return [GS203.finding(
        f"The gradient norm reached {peak:.3g} at step {step}, {peak / start:.3g} times its "
        f"median over the first five steps ({start:.3g}), while the loss ({losses[step]:.4g}) "
        f"was not below its start ({base:.4g}).",
        evidence={"step": step, "grad_norm": peak, "grad_norm_start": start,
                  "loss": losses[step], "loss_start": base})]

FAMILY = RuleFamily(
    number=2,
    rules=(GS201, GS202, GS203),
    step_checks=(Check(("GS203",), check_step_growth),),
    checks=(Check(("GS201",), check_static_exploding),
            Check(("GS202",), check_measured_exploding)),
)
