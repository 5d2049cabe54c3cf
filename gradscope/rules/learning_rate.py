"""GS6xx, learning rate: a measured range test where one ran, else update/weight facts.

A learning-rate factor computed from the first update's size (the usual band of
update/weight ratios is [1e-4, 1e-2] around 1e-3) rescued 3 of 24 failing training
runs and worsened 22 of 36 that trained (issue 14's experiment). So a factor is
advised only from a measured run: the range test (``gradscope.lr_range``) trains copies
of the model at the given rate and at factors of it, on the model's own loss and real
data. GS601 warns, with the range test's figures and a ``learning_rate`` action, only
where the given rate visibly failed there and another clearly trained; where the
given rate trained, nothing is said about it. Without a range test the ratios are
reported as facts, with no factor, and the message says what would enable the test.
Warmup advice (here and in GS703) is a share of the planned run (``--steps``, at most
10%), and omitted without it.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from gradscope.records import Finding, Location, Recommendation
from gradscope.rules.base import NOWHERE, Check, Rule, RuleFamily, location, op_of
from gradscope.rules.optimizers import UPDATE_RATIO_BAND, UPDATE_RATIO_TARGET
from gradscope.steps import EDGE, TrainingRecord, loss_end, loss_start, loss_trend

if TYPE_CHECKING:
    from gradscope.lr_range import RangeTest
    from gradscope.rules.base import Analysis

GS601 = Rule(
    code="GS601",
    name="learning-rate-scale",
    category="learning_rate",
    severity="info",
    summary="A short learning-rate range test showed the given rate failing (non-finite, "
    "rising or flat) while another trained: an error, with the measured rate; without a "
    "range test, the first update's size as a fact.",
    what="With --lr, a loss_fn and real data, copies of the model were trained for a few "
    "dozen steps of the given optimizer at the rate and at factors of it (0.01x to 100x), "
    "from the same weights and batches. Without them, the probe computed each layer's "
    "first optimiser step (SGD: lr * g; Adam/AdamW: lr * g / (|g| + eps), plus decoupled "
    "decay) without taking it: the median layer falls outside [1e-4, 1e-2].",
    why="A rate under which the loss goes non-finite, rises or does not move in a few "
    "dozen steps does not train; a range test shows which rate does (Smith 2017). The "
    "update/weight ratio alone does not say which rate trains: a factor computed from it "
    "worsened most runs that trained (issue 14).",
    fix="Use the measured rate (the largest factor that trained with the next larger one "
    "training too, a margin against the range test's short horizon). Without a range "
    "test: give loss_fn (and example_batches()) in the model file with --lr to run one.",
    references=("Smith 2017, Cyclical Learning Rates for Training Neural Networks",
                "CS231n, Neural Networks Part 3: ratio of weights:updates",
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


def check_learning_rate(analysis: Analysis) -> list[Finding]:
    """GS601: the range test's verdict where one ran, else the update/weight facts."""
    probe = analysis.probe
    if probe is None or probe.lr is None:
        return []
    if analysis.lr_range is not None and analysis.lr_range.given is not None:
        return _measured(analysis, analysis.lr_range)
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
    why_not = analysis.lr_range_skipped or "no range test ran"
    return [GS601.finding(
        f"Learning rate {probe.lr:g} with {probe.optimizer}: the median layer's first update "
        f"is {median:.1e} of its weight norm, {direction}r than the usual band "
        f"[{lo:g}, {hi:g}]. No factor is advised: the ratio alone does not say which rate "
        f"trains, and no learning-rate range test measured one ({why_not}).",
        location(analysis, worst), None, [warmup] if warmup and direction == "large" else [],
        {"median_update_ratio": median, "lr": probe.lr})]


def _range_evidence(test: RangeTest) -> dict[str, float | int | str | None]:
    """Every run's figures, flat (JSON evidence holds numbers and strings)."""
    given = test.given
    evidence: dict[str, float | int | str | None] = {
        "lr": test.lr, "optimizer": test.optimizer, "range_test_steps": test.steps,
        "range_test_batches": test.batches,
        "loss_start": given.start if given is not None else None}
    for run in test.runs:
        key = f"x{run.factor:g}"
        evidence[f"loss_end_{key}"] = run.end if math.isfinite(run.end) else None
        evidence[f"status_{key}"] = run.status if run.nonfinite_step is None else \
            f"non-finite at step {run.nonfinite_step}"
    if test.factor is not None:
        evidence["advised_factor"] = test.factor
        evidence["advised_lr"] = test.advised_lr
    return evidence


def _measured(analysis: Analysis, test: RangeTest) -> list[Finding]:
    """GS601 from the range test: a warning with the measured rate, or nothing.

    The given rate trained (or trained slowly): no finding, since a factor would only
    risk a run that works. It visibly failed and some factor trained with a margin: a
    warning whose recommendation carries that factor. It failed and none did: an info
    with the figures, no rate (the other findings say what to change in the model).
    """
    given = test.given
    assert given is not None
    if not test.given_fails:
        return []
    how = {"diverged": "diverged", "flat": "did not lower the loss"}[given.status] + \
        f" ({given.outcome()})"
    head = (f"Learning-rate range test ({test.optimizer}, {test.steps} steps over "
            f"{test.batches} batch(es) of your data): lr {test.lr:g} {how}")
    where = NOWHERE  # the whole model's learning rate
    # A loss that went non-finite at the given rate, measured on the user's data, is a run
    # that fails: an error whatever else is offered. A rate that rose or did not move while
    # another rate trained the same copy is a measured prediction too: an error, with that
    # rate (docs/trainability.md counts how often such runs failed and the advised rate
    # rescued them). Where no rate trained, the model is the problem: the other
    # rules say what to change, and this stays information.
    fatal = given.nonfinite_step is not None
    if fatal:
        head += (f"; at this rate the loss went non-finite at step {given.nonfinite_step}, "
                 "so the planned run will diverge")
    if test.factor is None or test.advised_lr is None:
        return [GS601.finding(
            f"{head}, and no factor from x0.01 to x100 trained with a margin "
            f"({test.summary()}): the learning rate alone does not fix this model.",
            where, "error" if fatal else "info", [], _range_evidence(test))]
    chosen = test.run(test.factor)
    assert chosen is not None
    new_lr = test.advised_lr
    text = (f"Set the learning rate to {new_lr:.3g} (x{test.factor:g}): in the range test it "
            f"took the mean loss over your batches from {chosen.start:.4g} to "
            f"{chosen.end:.4g} in {test.steps} steps, where lr {test.lr:g} {how}; "
            "it is the largest rate that trained with the next larger one training too, a "
            "margin against the test's short horizon.")
    recommendation = Recommendation(
        "learning_rate", text,
        f"optimizer = torch.optim.{_OPTIMIZER_CLASS.get(test.optimizer, 'SGD')}"
        f"(model.parameters(), lr={new_lr:.3g})",
        action={"op": "learning_rate", "lr": new_lr, "factor": test.factor})
    return [GS601.finding(
        f"{head}; lr {new_lr:.3g} (x{test.factor:g}) trained: {chosen.describe()}. All runs: "
        f"{test.summary()}.", where, "error", [recommendation], _range_evidence(test))]


#: The torch.optim class of each ``--optimizer`` choice, for the recommendation's code.
_OPTIMIZER_CLASS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


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


GS603 = Rule(
    code="GS603",
    name="update-ratio-out-of-band-in-training",
    category="learning_rate",
    severity="info",
    summary="During training, some layers' real updates are far outside the usual band.",
    what="Watching the first steps of a training run (gradscope.watch): a trainable "
    "module whose median ||update|| / ||W|| over the recorded steps (the update the "
    "optimiser really applied) is more than ten times above the band's top (1e-2) or "
    "more than ten times below its bottom (1e-4).",
    why="Above, the layer is rewritten every few steps and training is unstable; below, "
    "it barely moves and learns nothing in the planned run. Unlike the first-update "
    "check (GS601/GS602), this is the optimiser's real step, momentum, adaptive scaling "
    "and schedule included. Information, like GS601/GS602: the band is a rule of thumb, "
    "and runs outside it do train (SGD at 1.0 on character LSTMs updates by ~10% a step).",
    fix="Scale that layer's learning rate (a parameter group) towards 1e-3 x ||W|| per "
    "step, or the global rate when most layers are out of band.",
    references=("Karpathy, CS231n: ratio of weights:updates ~ 1e-3",),
)

GS604 = Rule(
    code="GS604",
    name="loss-rising-in-training",
    category="learning_rate",
    severity="error",
    summary="During training, the loss rose well above where it started.",
    what="Watching the first steps of a training run (gradscope.watch): the mean of the "
    "last five finite losses is more than 1.5 times the mean of the first five.",
    why="A loss that climbs from its start is an optimiser that overshoots: the learning "
    "rate is too large for the curvature the updates reach.",
    fix="Lower the learning rate (a factor of 3-10), add a warmup, or clip the gradient "
    "norm.",
    references=("Smith 2017, Cyclical Learning Rates for Training Neural Networks (WACV): "
                "the range test reads a rising loss as a rate too large",),
)

GS605 = Rule(
    code="GS605",
    name="loss-stalled-in-training",
    category="learning_rate",
    severity="warning",
    summary="During training, the loss shows no significant decrease.",
    what="Watching the first steps of a training run (gradscope.watch): a least-squares "
    "line through every finite loss has no significantly negative slope (t statistic "
    "above -2, at least 20 losses).",
    why="No detectable progress over the watched steps: the gradient does not reach the "
    "layers that matter (see GS105/GS403 on the same run), or the learning rate is far "
    "from the one this model needs.",
    fix="Read the other findings of the same watch for the cause; without one, try a "
    "learning rate 3-10 times larger (or smaller, with Adam) and normalisation.",
    references=("Bengio 2012, Practical Recommendations for Gradient-Based Training of "
                "Deep Architectures (arXiv:1206.5533)",),
)

GS606 = Rule(
    code="GS606",
    name="loss-spike-in-training",
    category="learning_rate",
    severity="info",
    summary="During training, the loss jumped far above its recent level at some steps.",
    what="Watching the first steps of a training run (gradscope.watch): a step whose loss "
    "is more than twice the median of the ten before it and more than ten median "
    "absolute deviations above it.",
    why="A spike is one update that overshot (a sharp region, an outlier batch): often "
    "harmless once, the sign of a rate at the edge of stability when it repeats. "
    "Information: at a low loss, one hard batch of a healthy run can double it too "
    "(seen on 4 of the 142 runs of the trainability benchmark that trained).",
    fix="If spikes repeat or grow, clip the gradient norm at about the norm of the steps "
    "before them, or lower the learning rate.",
    references=("Pascanu et al. 2013, On the difficulty of training recurrent neural "
                "networks (ICML): clipping against sudden gradient growth",),
)

#: A spike: twice the median of the ten losses before it, and ten of their median absolute
#: deviations above it (minibatch noise alone rarely reaches either).
SPIKE_FACTOR, SPIKE_MADS, SPIKE_WINDOW = 2.0, 10.0, 10

#: Ten times outside UPDATE_RATIO_BAND: the layer rewritten or frozen, not merely fast/slow.
OUT_OF_BAND = 10.0
#: The last five losses over the first five.
RISE_FACTOR = 1.5
#: A t statistic of the loss's slope above this is no significant decrease (about 2 sigma).
STALL_T = -2.0


def check_step_update_band(record: TrainingRecord) -> list[Finding]:
    low, high = UPDATE_RATIO_BAND[0] / OUT_OF_BAND, UPDATE_RATIO_BAND[1] * OUT_OF_BAND
    out = []
    for name in record.trainable:
        series = [v for _, v in record.series(name, "update_ratio")]
        if not series:
            continue
        med = sorted(series)[len(series) // 2]
        if med > high or 0 < med < low:
            out.append((name, med))
    if not out:
        return []
    big = [item for item in out if item[1] > high]
    worst = max(out, key=lambda item: abs(math.log10(item[1])))
    side = "above" if worst[1] > high else "below"
    return [GS603.finding(
        f"{len(out)} of {len(record.trainable)} trainable module(s) have real updates "
        f"outside the band ({len(big)} above {high:.0e}, {len(out) - len(big)} below "
        f"{low:.0e}); the farthest, {worst[0]}, moves by {worst[1]:.2g} of its weight norm "
        f"per step (median over the recorded steps), {side} the band.",
        Location(module=worst[0]),
        evidence={"modules": len(out), "above": len(big), "update_ratio": worst[1]})]


def _risen(record: TrainingRecord) -> tuple[float, float] | None:
    """(start, end) loss means when the loss rose by RISE_FACTOR over at least two edges
    of steps: GS604's finding, which GS605 leaves to it."""
    start, end = loss_start(record), loss_end(record)
    if len(record.finite_losses()) < 2 * EDGE or start is None or end is None:
        return None
    return (start, end) if start > 0 and end > RISE_FACTOR * start else None


def check_step_loss_rising(record: TrainingRecord) -> list[Finding]:
    risen = _risen(record)
    if risen is None:
        return []
    start, end = risen
    return [GS604.finding(
        f"The loss rose from {start:.4g} (mean of the first five steps) to {end:.4g} (the "
        f"last five of {len(record.finite_losses())}).",
        evidence={"loss_start": start, "loss_end": end})]


def check_step_loss_spikes(record: TrainingRecord) -> list[Finding]:
    points = record.finite_losses()
    spikes = []
    for k in range(SPIKE_WINDOW, len(points)):
        before = [v for _, v in points[k - SPIKE_WINDOW:k]]
        med = statistics.median(before)
        spread = statistics.median(abs(v - med) for v in before)
        step, value = points[k]
        if med > 0 and value > SPIKE_FACTOR * med and value - med > SPIKE_MADS * spread:
            spikes.append((step, value, med))
    if not spikes:
        return []
    step, value, med = max(spikes, key=lambda item: item[1] / item[2])
    return [GS606.finding(
        f"{len(spikes)} loss spike(s); the largest at step {step}: {value:.4g} against a "
        f"median of {med:.4g} over the ten steps before.",
        evidence={"spikes": len(spikes), "step": step, "loss": value, "median_before": med})]


def check_step_loss_stalled(record: TrainingRecord) -> list[Finding]:
    trend = loss_trend(record)
    if trend is None or record.first_nonfinite_step is not None:
        return []
    slope, t, n = trend
    losses = [v for _, v in record.finite_losses()]
    if t <= STALL_T or _risen(record) is not None:
        return []  # decreasing; or rising, which GS604 reports
    return [GS605.finding(
        f"Over {n} steps the loss went from {losses[0]:.4g} to {losses[-1]:.4g}: its trend "
        f"is {slope:.2g} per step (t = {t:.2g}), no significant decrease.",
        evidence={"slope": slope, "t": t, "steps": n})]

FAMILY = RuleFamily(
    number=6,
    rules=(GS601, GS602, GS603, GS604, GS605, GS606),
    step_checks=(Check(("GS603",), check_step_update_band),
                 Check(("GS604",), check_step_loss_rising),
                 Check(("GS605",), check_step_loss_stalled),
                 Check(("GS606",), check_step_loss_spikes)),
    checks=(Check(("GS601",), check_learning_rate),
            Check(("GS602",), check_layer_learning_rates)),
)
