"""What ``gradscope.watch`` recorded over the first steps of a real training run.

Torch-free, like :mod:`gradscope.records`: the rules over steps (GS105, GS106, GS203, GS403,
GS503, GS603-GS606), the report model and the renderers read these records without
loading torch. ``gradscope.watch`` fills them.

Two cadences, because their costs differ by orders of magnitude:

- every step up to the horizon: the loss the user hands over and the total gradient norm
  (one fused norm over the parameters' gradients, read back in bulk), which is all the
  loss and non-finite rules need, and cheap enough to take at every step;
- every ``every``-th step: per module, the gradient reaching its output, its weights'
  gradient and weight norms, the update the optimizer really applied, and the dead or
  saturated share of its output (hooks armed for that step only).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerStep:
    """One watched module at one recorded step."""

    #: RMS of dLoss/d(module output) over its elements, divided by the same RMS at the
    #: model's output: the figure the before-training probe reports as gradient health.
    grad_rms: float | None = None
    #: ||grad W|| over the module's own parameters, and ||W|| before the step.
    weight_grad_norm: float | None = None
    weight_norm: float | None = None
    #: ||W after the optimizer step - W before|| / ||W before||: the real update.
    update_ratio: float | None = None
    #: Share of a ReLU-like module's units inactive on every sample of the batch.
    dead_fraction: float | None = None
    #: Share of a sigmoid/tanh-like module's outputs in the flat tails.
    saturated_fraction: float | None = None
    nonfinite_forward: bool = False
    nonfinite_grad: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"grad_rms": self.grad_rms, "weight_grad_norm": self.weight_grad_norm,
                "weight_norm": self.weight_norm, "update_ratio": self.update_ratio,
                "dead_fraction": self.dead_fraction,
                "saturated_fraction": self.saturated_fraction,
                "nonfinite_forward": self.nonfinite_forward,
                "nonfinite_grad": self.nonfinite_grad}


@dataclass
class StepRecord:
    """The per-module figures of one recorded step (every ``every``-th step)."""

    step: int
    layers: dict[str, LayerStep] = field(default_factory=dict)
    #: RMS of dLoss/d(model output) at this step (what ``grad_rms`` is divided by).
    output_grad_rms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "output_grad_rms": self.output_grad_rms,
                "layers": {name: layer.to_dict() for name, layer in self.layers.items()}}


@dataclass
class TrainingRecord:
    """Everything one watch saw: per-step series and the recorded steps' module figures."""

    every: int
    horizon: int
    optimizer: str
    #: Learning rate of the optimizer's first parameter group at the first step.
    lr: float | None
    #: Watched modules in registration order: path -> class name.
    modules: dict[str, str] = field(default_factory=dict)
    #: Modules that own trainable parameters (their weight and update figures exist).
    trainable: tuple[str, ...] = ()
    #: Watched modules in the order their forward first ran at the first recorded step.
    order: tuple[str, ...] = ()
    #: ReLU-like modules (dead share) and sigmoid/tanh-like ones (saturated share).
    rectifiers: tuple[str, ...] = ()
    squashers: tuple[str, ...] = ()
    #: Per step from 0: the loss handed to the watch (None where none was), and the
    #: total gradient norm over every trainable parameter at the optimizer step.
    losses: list[float | None] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    recorded: list[StepRecord] = field(default_factory=list)
    #: The first step whose loss or total gradient norm is not finite, and the modules
    #: whose parameters' gradients were not finite at that step (registration order).
    first_nonfinite_step: int | None = None
    first_nonfinite_modules: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Optimizer steps seen (up to the horizon)."""
        return len(self.grad_norms)

    def finite_losses(self) -> list[tuple[int, float]]:
        """(step, loss) for the steps with a finite loss, before any non-finite step."""
        end = self.first_nonfinite_step if self.first_nonfinite_step is not None \
            else len(self.losses)
        return [(i, v) for i, v in enumerate(self.losses[:end])
                if v is not None and math.isfinite(v)]

    def series(self, name: str, attr: str) -> list[tuple[int, float]]:
        """(step, figure) of one module over the recorded steps, finite figures only."""
        out = []
        for rec in self.recorded:
            layer = rec.layers.get(name)
            value = getattr(layer, attr) if layer is not None else None
            if value is not None and math.isfinite(value):
                out.append((rec.step, float(value)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"every": self.every, "horizon": self.horizon, "steps": self.steps,
                "optimizer": self.optimizer, "lr": self.lr,
                "modules": dict(self.modules), "trainable": list(self.trainable),
                "order": list(self.order),
                "rectifiers": list(self.rectifiers), "squashers": list(self.squashers),
                "notes": list(self.notes),
                "losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "first_nonfinite_step": self.first_nonfinite_step,
                "first_nonfinite_modules": list(self.first_nonfinite_modules),
                "recorded": [r.to_dict() for r in self.recorded]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TrainingRecord:
        """The record back from :meth:`to_dict` (a saved watch judged again)."""
        def num(v: Any) -> float | None:
            return None if v is None else float(v)

        recorded = [StepRecord(step=int(r["step"]), output_grad_rms=num(r["output_grad_rms"]),
                               layers={n: LayerStep(**layer) for n, layer in r["layers"].items()})
                    for r in doc.get("recorded", [])]
        return cls(every=int(doc["every"]), horizon=int(doc["horizon"]),
                   optimizer=str(doc["optimizer"]), lr=num(doc.get("lr")),
                   modules=dict(doc.get("modules", {})),
                   trainable=tuple(doc.get("trainable", ())),
                   order=tuple(doc.get("order", ())),
                   rectifiers=tuple(doc.get("rectifiers", ())),
                   squashers=tuple(doc.get("squashers", ())),
                   losses=[num(v) for v in doc.get("losses", [])],
                   grad_norms=[num(v) for v in doc.get("grad_norms", [])],
                   recorded=recorded,
                   first_nonfinite_step=doc.get("first_nonfinite_step"),
                   first_nonfinite_modules=tuple(doc.get("first_nonfinite_modules", ())),
                   notes=list(doc.get("notes", [])))


# ---------------------------------------------------------------------------
# Figures several rules over steps read (one definition each)


def loss_trend(record: TrainingRecord) -> tuple[float, float, int] | None:
    """(slope per step, its t statistic, points) of a least-squares line through the finite
    losses before any non-finite step; None with fewer than ``MIN_TREND_POINTS``.

    A line through all the watched losses, not two windows: every step's loss counts, so a
    real but slow decrease is told from noise with the most power the watch has.
    """
    points = record.finite_losses()
    n = len(points)
    if n < MIN_TREND_POINTS:
        return None
    xs = [float(i) for i, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx) if resid > 0 else 0.0
    t = slope / se if se > 0 else (-math.inf if slope < 0 else math.inf if slope > 0 else 0.0)
    return slope, t, n


#: Fewest finite losses a trend is fitted to: below, two windows of noise decide nothing.
MIN_TREND_POINTS = 20

#: How many steps a run's start (and its end) is read from.
EDGE = 5


def start_norm(record: TrainingRecord) -> float | None:
    """The gradient norm a run starts at: the median of its first ``EDGE`` finite norms
    before any non-finite step (GS203 measures growth from it, ``gradscope.replay`` clips
    at it); None without that many."""
    end = record.first_nonfinite_step if record.first_nonfinite_step is not None \
        else len(record.grad_norms)
    norms = [v for v in record.grad_norms[:end] if v is not None and math.isfinite(v)]
    return float(statistics.median_high(norms[:EDGE])) if len(norms) >= EDGE else None


def loss_start(record: TrainingRecord) -> float | None:
    """The mean of the first ``EDGE`` finite losses (before any non-finite step), or None."""
    losses = [v for _, v in record.finite_losses()]
    return sum(losses[:EDGE]) / EDGE if len(losses) >= EDGE else None


def loss_end(record: TrainingRecord) -> float | None:
    """The mean of the last ``EDGE`` finite losses (before any non-finite step), or None."""
    losses = [v for _, v in record.finite_losses()]
    return sum(losses[-EDGE:]) / EDGE if len(losses) >= EDGE else None


def health(record: TrainingRecord, index: int, name: str) -> float | None:
    """Module ``name``'s finite gradient health at recorded step ``index``, else None."""
    layer = record.recorded[index].layers.get(name)
    value = layer.grad_rms if layer is not None else None
    return float(value) if value is not None and math.isfinite(value) else None


def input_layer(record: TrainingRecord) -> str | None:
    """The trainable module nearest the input: the first to run in the forward pass (the
    recorded order; registration order for a record without one) with a gradient figure.

    Where the before-training rules judge vanishing (the first trainable layer on each
    path): side branches whose gradient is small by design (attention's query and key
    projections before the attention sharpens, a gate) are not the input end.
    """
    if not record.recorded:
        return None
    trainable = set(record.trainable)
    order = [n for n in (record.order or tuple(record.modules)) if n in trainable]
    return next((n for n in order if health(record, 0, n) is not None), None)
