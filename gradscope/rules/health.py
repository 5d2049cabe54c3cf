"""Gradient health: the one figure the rules judge, per layer, and its class.

The figure is the *gradient ratio*: the norm of dLoss/d(node output) relative to
the output's, with averaging ops (global pooling, means) discounted because they
shrink the gradient by design, not by decay (``health = sqrt(S / structural)``,
see ``docs/static-estimate.md``). The static estimate predicts it for every node;
the probe measures it (``sq_norm`` over the same structural gain).

It is *judged* only at the entry layers: the first trainable layer on each path
from the inputs, the farthest the gradient must travel. Layers behind them are
not judged (attention's query/key projections are weak by design at
initialisation; a layer next to the output is healthy whenever an entry layer
is), and each says why in :attr:`LayerHealth.note`. The vanishing and exploding
rules (GS101/GS102/GS201/GS202) read the classes made here, and the report shows
the same classes: a layer is coloured bad or warn exactly where the rules say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradscope.options import Thresholds
from gradscope.records import HealthClass

if TYPE_CHECKING:
    from gradscope.estimate.engine import StaticEstimate
    from gradscope.probe import ProbeResult

_RANK: dict[HealthClass | None, int] = {None: -1, "ok": 0, "warn": 1, "bad": 2}

NOT_ENTRY = ("not judged: only the first trainable layer on each path from the inputs is "
             "(the gradient's longest way); layers behind it are weak or strong by design")
NO_FIGURE = "not judged: no finite gradient ratio (no estimate and no measurement)"
NONFINITE = "bad: non-finite values here on the probe batches (GS501/GS502)"
BEHIND_ZERO = ("not judged: behind a zero-initialised layer (by design: ReZero/SkipInit gains, "
               "Fixup, a zero-initialised head), it gets no gradient until the first update")
SCALE_INVARIANT = ("not judged on the exploding side: normalised right after (its weights are "
                   "scale-invariant, so a large gradient norm here shrinks as they grow and does "
                   "not make its relative updates large)")
OFF_PATH = ("not judged: off the differentiated path (its output does not reach the output "
            "the probe differentiates, so this loss gives it no gradient by construction)")


def log_distance(ratio: float | None) -> float:
    """How far a gradient ratio is from 1, in decades (inf for 0, None or non-finite)."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return math.inf
    return abs(math.log10(ratio))


def classify(value: float | None, t: Thresholds) -> HealthClass | None:
    """The class of one gradient ratio against the thresholds the rules use.

    The bounds are the rules' own: below ``vanishing_warning`` a warning, below
    ``vanishing_error`` an error (``bad``); above ``exploding_warning`` a warning,
    above ``exploding_error`` an error. A value that is missing or not finite is
    not judged (no rule compares it): None.
    """
    if value is None or not math.isfinite(value):
        return None
    if value < t.vanishing_error or value > t.exploding_error:
        return "bad"
    if value < t.vanishing_warning or value > t.exploding_warning:
        return "warn"
    return "ok"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True)
class LayerHealth:
    """One layer's gradient health as the report shows it and the rules judged it."""

    #: The figure behind ``cls``: the measured ratio where the probe judged the layer,
    #: else the predicted one.
    value: float | None
    #: ``measured``, ``predicted`` or None when no figure exists.
    source: str | None
    #: ``ok``, ``warn`` or ``bad``; None when the layer is not judged.
    cls: HealthClass | None
    #: Why the layer is not judged, or what judged it.
    note: str | None


@dataclass
class HealthTable:
    """Predicted and measured gradient ratios for every node, classes for the judged ones."""

    thresholds: Thresholds
    entries: tuple[str, ...]
    predicted: dict[str, float | None] = field(default_factory=dict)
    measured: dict[str, float | None] = field(default_factory=dict)
    #: Whether the measured ratios are judged (the probe ran and stayed finite).
    measured_judged: bool = False
    nonfinite: frozenset[str] = frozenset()
    #: Nodes whose output reaches the differentiated output (empty: all of them).
    on_path: frozenset[str] = frozenset()
    #: Nodes behind a zero-initialised layer (no gradient until the first update).
    behind_zero_init: frozenset[str] = frozenset()
    #: Entry layers normalised right after: not judged on the exploding side.
    normalised: frozenset[str] = frozenset()

    def extremes(self, measured: bool, skip: frozenset[str] = frozenset(),
                 ) -> tuple[str, float, str, float] | None:
        """(argmin, min, argmax, max) of the finite ratios over the entry layers."""
        values = self.measured if measured else self.predicted
        finite = [(n, float(v)) for n in self.entries
                  if n not in skip and (v := values.get(n)) is not None and math.isfinite(v)]
        if not finite:
            return None
        lo = min(finite, key=lambda item: item[1])
        hi = max(finite, key=lambda item: item[1])
        return lo[0], lo[1], hi[0], hi[1]

    def worst_direction(self) -> str:
        """``low`` if the entry layers' predicted ratio is farther below 1 than above, else
        ``high``: which way a fix that changes the whole stack has to move it."""
        ext = self.extremes(measured=False)
        if ext is None:
            return "low"
        return "low" if log_distance(ext[1]) >= log_distance(ext[3]) else "high"

    def of(self, node: str) -> LayerHealth:
        """The health of ``node`` (any node; only entry layers get a judged class)."""
        if self.on_path and node not in self.on_path:
            return LayerHealth(None, None, None, OFF_PATH)
        if node in self.behind_zero_init:
            return LayerHealth(None, None, None, BEHIND_ZERO)
        if node in self.nonfinite:
            return LayerHealth(self.measured.get(node), "measured", "bad", NONFINITE)
        predicted = self.predicted.get(node)
        measured = self.measured.get(node)
        if node not in self.entries:
            shown, source = (measured, "measured") if _finite(measured) else (
                (predicted, "predicted") if _finite(predicted) else (None, None))
            return LayerHealth(shown, source, None, NOT_ENTRY)
        # A measurement outranks the estimate at the same layer: the probe ran the real
        # model, the estimate is a mean-field model of it.
        if self.measured_judged and _finite(measured):
            cls, source, value = classify(measured, self.thresholds), "measured", measured
        elif _finite(predicted):
            cls, source, value = classify(predicted, self.thresholds), "predicted", predicted
        else:
            return LayerHealth(None, None, None, NO_FIGURE)
        if node in self.normalised and value is not None \
                and value > self.thresholds.exploding_warning:
            return LayerHealth(value, source, None, SCALE_INVARIANT)
        rules = {"measured": "GS102/GS202", "predicted": "GS101/GS201"}[source]
        note = f"judged {source} ({rules})" if cls != "ok" else f"entry layer, {source}"
        return LayerHealth(value, source, cls, note)

    def predicted_extreme(self, low: bool) -> tuple[str, float, HealthClass] | None:
        """The entry layer a predicted finding (GS101 low, GS201 high) points at.

        Among the entry layers whose predicted ratio is past the warning threshold in
        that direction and that the measurement confirms (:meth:`confirmed`), the most
        extreme prediction: (node, predicted ratio, confirmed class); None if none.
        """
        t = self.thresholds
        found: list[tuple[str, float, HealthClass]] = []
        for node in self.entries:
            if not low and node in self.normalised:
                continue  # scale-invariant weights: a large norm is not an explosion
            value = self.predicted.get(node)
            if value is None or not math.isfinite(value):
                continue
            if not (value < t.vanishing_warning if low else value > t.exploding_warning):
                continue
            cls = self.confirmed(node, "bad" if classify(value, t) == "bad" else "warn")
            if cls in ("warn", "bad"):
                found.append((node, value, cls))  # type: ignore[arg-type]
        if not found:
            return None
        pick = min if low else max
        return pick(found, key=lambda item: item[1])

    def finding_at(self, low: bool, measured: bool,
                   ) -> tuple[str, float, HealthClass, dict[str, float]] | None:
        """Where a vanishing (``low``) or exploding gradient finding points, and at what class.

        Measured (GS102/GS202): the most extreme measured entry layer past the warning
        threshold, at its measured class. Predicted (GS101/GS201): the most extreme
        prediction the measurement confirms (:meth:`predicted_extreme`), with the
        measured figure at that layer as evidence. (node, ratio, class, extra evidence).
        """
        t = self.thresholds
        if not measured:
            found = self.predicted_extreme(low)
            if found is None:
                return None
            node, value, cls = found
            confirmed_by = self.measured.get(node)
            extra = {"measured_ratio": confirmed_by} \
                if self.measured_judged and confirmed_by is not None else {}
            return node, value, cls, extra
        ext = self.extremes(True, skip=frozenset() if low else self.normalised)
        if ext is None:
            return None
        node, value = (ext[0], ext[1]) if low else (ext[2], ext[3])
        if not (value < t.vanishing_warning if low else value > t.exploding_warning):
            return None
        judged = classify(value, t)
        return (node, value, judged, {}) if judged in ("warn", "bad") else None

    def measured_class(self, node: str) -> HealthClass | None:
        """The measured class of an entry layer, None where the probe did not judge it."""
        value = self.measured.get(node)
        if not self.measured_judged or not _finite(value):
            return None
        return classify(value, self.thresholds)

    def confirmed(self, node: str, predicted: HealthClass) -> HealthClass | None:
        """A predicted class as far as the measurement at the same layer confirms it.

        Where the probe measured the layer, the predicted finding keeps at most the
        measured class (a measurement of ok drops it: the estimate was wrong there);
        where it did not, the prediction stands.
        """
        measured = self.measured_class(node)
        if measured is None:
            return predicted
        return predicted if _RANK[predicted] <= _RANK[measured] else measured


def build_health(est: StaticEstimate, probe: ProbeResult | None, thresholds: Thresholds,
                 entries: Sequence[str], on_path: frozenset[str] = frozenset(),
                 behind_zero_init: frozenset[str] = frozenset(),
                 normalised: frozenset[str] = frozenset()) -> HealthTable:
    """The health table of one analysis (computed once; every stage reads this one)."""
    measured: dict[str, float | None] = {}
    nonfinite: set[str] = set()
    judged = False
    if probe is not None:
        for node, sq in probe.sq_norm.items():
            structural = est.structural.get(node, 1.0) or 1.0
            measured[node] = math.sqrt(sq / structural) if math.isfinite(sq) else None
        judged = not (probe.nonfinite_forward or probe.nonfinite_backward)
        nonfinite = set(probe.nonfinite_forward) | set(probe.nonfinite_backward)
    return HealthTable(thresholds=thresholds, entries=tuple(entries),
                       predicted=dict(est.health), measured=measured, measured_judged=judged,
                       nonfinite=frozenset(nonfinite), on_path=on_path,
                       behind_zero_init=behind_zero_init, normalised=normalised)
