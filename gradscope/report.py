"""The report model: plain data between the analysis and the renderers.

Nothing here imports torch, so renderers, ``gradscope diff`` and CI tooling
can read and write reports on machines without it. The analysis fills these
records once; renderers only read them (computing and rendering never mix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gradscope._version import __version__
from gradscope.records import (
    CATEGORIES,
    HEALTH_CLASSES,
    RECOMMENDATION_KINDS,
    SEVERITIES,
    Finding,
    Location,
    Recommendation,
    Severity,
    TraceAttempt,
    Verification,
    reaches,
    severity_rank,
)
from gradscope.steps import TrainingRecord

SCHEMA_VERSION = 1

Status = Literal["healthy", "warning", "unhealthy"]


@dataclass
class Layer:
    """One graph node as reported: what it is, and what the estimate and probe saw."""

    name: str
    op: str
    depth: int
    module: str | None = None
    module_class: str | None = None
    kind: str = "call_function"
    inputs: Sequence[str] = ()
    shape: Sequence[int] | None = None
    dtype: str | None = None
    num_params: int = 0
    file: str | None = None
    line: int | None = None
    understood: bool = True
    static_grad_rms: float | None = None
    probe_grad_rms: float | None = None
    param_grad_ratio: float | None = None
    param_grad_norm: float | None = None
    update_ratio: float | None = None
    #: Smallest and largest per-batch probe_grad_rms (the spread across probe batches).
    probe_grad_rms_min: float | None = None
    probe_grad_rms_max: float | None = None
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    nonfinite_forward: bool = False
    nonfinite_backward: bool = False
    #: Gradient health (``gradscope.rules.health``): the gradient-norm ratio to the output
    #: the rules judge, its source (measured/predicted), its class against the thresholds
    #: (ok/warn/bad; None when no rule judges the layer) and why it is not judged or what
    #: judged it.
    health: float | None = None
    health_source: str | None = None
    health_class: str | None = None
    health_note: str | None = None
    #: The same ratio as predicted by the static estimate and as measured by the probe.
    health_predicted: float | None = None
    health_measured: float | None = None
    #: A recurrent layer's predicted gradient at its input per time step, relative to the
    #: largest step's (static estimate); None for other layers.
    time_profile: Sequence[float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = self._fields()
        if self.time_profile is not None:  # recurrent layers only: absent elsewhere
            doc["time_profile"] = list(self.time_profile)
        return doc

    def _fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "op": self.op,
            "depth": self.depth,
            "static_grad_rms": self.static_grad_rms,
            "probe_grad_rms": self.probe_grad_rms,
            "param_grad_ratio": self.param_grad_ratio,
            "dead_fraction": self.dead_fraction,
            "saturated_fraction": self.saturated_fraction,
            "module_class": self.module_class,
            "kind": self.kind,
            "inputs": list(self.inputs),
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "num_params": self.num_params,
            "file": self.file,
            "line": self.line,
            "understood": self.understood,
            "param_grad_norm": self.param_grad_norm,
            "update_ratio": self.update_ratio,
            "probe_grad_rms_min": self.probe_grad_rms_min,
            "probe_grad_rms_max": self.probe_grad_rms_max,
            "nonfinite_forward": self.nonfinite_forward,
            "nonfinite_backward": self.nonfinite_backward,
            "health": self.health,
            "health_source": self.health_source,
            "health_class": self.health_class,
            "health_note": self.health_note,
            "health_predicted": self.health_predicted,
            "health_measured": self.health_measured,
        }


@dataclass
class TraceInfo:
    """How the graph was obtained: the method used, the ones that failed first, coverage."""

    method: str
    ok: bool
    message: str | None
    attempts: Sequence[TraceAttempt] = ()
    num_nodes: int = 0
    coverage: float = 1.0
    unknown_ops: Sequence[str] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ok": self.ok,
            "message": self.message,
            "attempts": [a.to_dict() for a in self.attempts],
            "num_nodes": self.num_nodes,
            "coverage": self.coverage,
            "unknown_ops": list(self.unknown_ops),
        }


@dataclass
class ModelInfo:
    """Facts about the model and how it was fed."""

    name: str
    num_parameters: int
    device: str
    trace: TraceInfo
    num_trainable_parameters: int = 0
    output: str | None = None
    inputs: Sequence[Mapping[str, Any]] = ()
    source: str | None = None
    #: The nn.Module hierarchy: each submodule's path and class, in registration order
    #: (the report's per-module table names containers no graph node stands for).
    modules: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_parameters": self.num_parameters,
            "num_trainable_parameters": self.num_trainable_parameters,
            "device": self.device,
            "trace": self.trace.to_dict(),
            "output": self.output,
            "inputs": [dict(i) for i in self.inputs],
            "source": self.source,
            "modules": dict(self.modules),
        }


@dataclass
class ProbeInfo:
    """How the probe ran, or why it did not."""

    enabled: bool
    device: str | None = None
    batch_size: int | None = None
    loss: str | None = None
    seed: int | None = None
    mode: str | None = None
    output_grad_rms: float | None = None
    nonfinite_forward: str | None = None
    nonfinite_backward: str | None = None
    lr: float | None = None
    optimizer: str | None = None
    batches: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "batches": self.batches,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "device": self.device,
            "batch_size": self.batch_size,
            "loss": self.loss,
            "seed": self.seed,
            "mode": self.mode,
            "output_grad_rms": self.output_grad_rms,
            "nonfinite_forward": self.nonfinite_forward,
            "nonfinite_backward": self.nonfinite_backward,
        }


@dataclass
class Report:
    """Everything one analysis found; ``to_dict`` is the JSON report (docs/contract.md s. 4)."""

    model: ModelInfo
    layers: list[Layer]
    findings: list[Finding]
    probe: ProbeInfo
    summary: dict[str, float | int | str | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gradscope_version: str = __version__
    #: The watched training steps (``gradscope.watch``); None for a before-training report.
    steps: TrainingRecord | None = None

    @property
    def status(self) -> Status:
        """unhealthy iff an error finding, warning iff a warning one (docs/contract.md s. 4)."""
        severities = {f.severity for f in self.findings}
        if "error" in severities:
            return "unhealthy"
        if "warning" in severities:
            return "warning"
        return "healthy"

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def fails(self, fail_on: str) -> bool:
        """Whether a finding at or above ``fail_on`` exists (``never`` never fails)."""
        return any(reaches(f.severity, fail_on) for f in self.findings)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; non-finite floats become ``null`` plus a note saying where."""
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "gradscope_version": self.gradscope_version,
            "status": self.status,
            "model": self.model.to_dict(),
            "probe": self.probe.to_dict(),
            "summary": dict(self.summary),
            "layers": [layer.to_dict() for layer in self.layers],
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }
        if self.steps is not None:
            doc["steps"] = self.steps.to_dict()
        extra_notes: list[str] = []
        doc = _finite_only(doc, "", extra_notes)
        doc["notes"].extend(extra_notes)
        return doc


def watch_report(name: str, record: TrainingRecord, findings: Sequence[Finding], *,
                 num_parameters: int, num_trainable: int, device: str,
                 cls: type[Report] | None = None) -> Report:
    """The report of a watched training run: the findings of the rules over steps and the
    record they read; no layer table (the per-module figures are per step, in ``steps``).
    ``cls``: the API's subclass with its writers (``gradscope.render.notebook``)."""
    steps = record.steps
    summary: dict[str, float | int | str | None] = {
        "steps_watched": steps, "every": record.every, "horizon": record.horizon,
        "optimizer": record.optimizer, "lr": record.lr,
        "first_nonfinite_step": record.first_nonfinite_step}
    losses = record.finite_losses()
    if losses:
        summary["first_loss"] = losses[0][1]
        summary["last_loss"] = losses[-1][1]
    return (cls or Report)(
        model=ModelInfo(name=name, num_parameters=num_parameters, device=device,
                        trace=TraceInfo(method="watch", ok=True, message=None),
                        num_trainable_parameters=num_trainable, modules=dict(record.modules)),
        layers=[], findings=list(findings), probe=ProbeInfo(enabled=False),
        summary=summary, notes=list(record.notes), steps=record)


def _finite_only(value: Any, where: str, notes: list[str]) -> Any:
    """Replace NaN/Inf by None (JSON has neither) and record each replacement."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        notes.append(f"{where or 'value'} was {value!r}, written as null")
        return None
    if isinstance(value, dict):
        return {k: _finite_only(v, f"{where}.{k}" if where else str(k), notes)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_only(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    return value


__all__ = [
    "CATEGORIES",
    "HEALTH_CLASSES",
    "RECOMMENDATION_KINDS",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "Finding",
    "Layer",
    "Location",
    "ModelInfo",
    "ProbeInfo",
    "Recommendation",
    "Report",
    "Severity",
    "Status",
    "TraceAttempt",
    "TraceInfo",
    "Verification",
    "severity_rank",
]
