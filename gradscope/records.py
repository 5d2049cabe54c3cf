"""Plain, torch-free records that several stages share: findings and how a graph was traced.

A rule (``gradscope.rules``) writes :class:`Finding` records; the tracers write
:class:`TraceAttempt`; the report model (``gradscope.report``) and the renderers read
both. They live below every stage so that no stage has to import a later one to
name its output (the report model imports them, never the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]

#: Severities from most to least serious; ``--fail-on`` compares against it.
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

CATEGORIES = (
    "vanishing_gradient",
    "exploding_gradient",
    "saturation",
    "dead_units",
    "nonfinite",
    "learning_rate",
    "architecture",
    "trace",
)

RECOMMENDATION_KINDS = (
    "gradient_clipping",
    "residual_connection",
    "learning_rate",
    "warmup",
    "activation",
    "normalization",
    "initialization",
)


def severity_rank(severity: str) -> int:
    """0 for error, 1 for warning, 2 for info: lower is more serious."""
    return SEVERITIES.index(severity)  # type: ignore[arg-type]


def reaches(severity: str, fail_on: str) -> bool:
    """Whether a finding of ``severity`` is at or above ``fail_on`` (``never``: nothing is).

    The one definition behind the exit code, ``Report.fails``, baselines and the
    pytest helper.
    """
    return fail_on != "never" and severity_rank(severity) <= severity_rank(fail_on)


def finding_identity(rule: str, location: Mapping[str, Any]) -> tuple[str, str | None,
                                                                       str | None]:
    """(rule, module or node, file base name): what "the same finding" means across runs.

    Not the message (its figures change with every fix attempt), not the line
    (unrelated edits move it), not the directory (CI checkouts and laptops
    differ). Baselines match findings on it; SARIF's fingerprint is built from it.
    """
    file = location.get("file")
    # Split on both separators: a Windows report read on Linux keeps its backslashes.
    base = str(file).replace("\\", "/").rsplit("/", 1)[-1] if file else None
    return str(rule), location.get("module") or location.get("node"), base


@dataclass(frozen=True)
class Verification:
    """A fix tried on a copy of the model's graph: the figure it targets, before and after.

    Both figures come from the same static estimate (one on the model as it is,
    one on the changed copy), so they compare like with like even when the
    finding itself was measured by the probe.
    """

    metric: str
    before: float
    after: float

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class Recommendation:
    """One fix, with its numbers already filled in."""

    kind: str
    text: str
    code: str | None = None
    #: Architecture, activation, normalisation and initialisation fixes carry the
    #: estimate before and after applying them; None for advice that is not a
    #: change of the model (clipping, learning rate, warmup).
    verified: Verification | None = None
    #: Every module (or ``first .. last`` span) the fix applies to, in full: the text may
    #: name a few and say "and N more", this list never elides.
    targets: tuple[str, ...] = ()
    #: The change in machine-readable form, for ``gradscope.fixes.apply`` and for
    #: scripts: ``{"op": NAME, ...parameters}`` with JSON values only (the ops and their
    #: parameters are listed in docs/contract.md); None where nothing can apply it
    #: mechanically (advice that needs editing the model's source by hand).
    action: dict[str, Any] | None = None
    #: A short measured training run of the change (``gradscope.trial``): the mean loss
    #: over the user's batches after the range test's steps at the given rate, without
    #: and with the change; None where nothing was trained.
    measured: Verification | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "code": self.code,
                "verified": self.verified.to_dict() if self.verified else None,
                "targets": list(self.targets), "action": self.action,
                "measured": self.measured.to_dict() if self.measured else None}


@dataclass(frozen=True)
class Location:
    """Where a finding points: graph node, module path and the user's source line."""

    module: str | None = None
    node: str | None = None
    file: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "node": self.node, "file": self.file, "line": self.line}

    def short(self) -> str:
        """``file:line (module)`` or whatever part of it is known."""
        parts = []
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.module:
            parts.append(self.module if not parts else f"({self.module})")
        elif self.node and not parts:
            parts.append(self.node)
        return " ".join(parts) if parts else "<model>"


@dataclass(frozen=True)
class Finding:
    """A rule's verdict at one place; frozen so rules cannot edit each other's output."""

    rule: str
    category: str
    severity: Severity
    message: str
    location: Location = Location()
    recommendations: tuple[Recommendation, ...] = ()
    #: The figures the verdict rests on (ratios, thresholds), for reports and diffs.
    evidence: Mapping[str, float | int | str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "category": self.category,
            "severity": self.severity,
            "message": self.message,
            "location": self.location.to_dict(),
            "recommendations": [r.to_dict() for r in self.recommendations],
            "evidence": dict(self.evidence),
        }


#: Classes of a layer's gradient health (``Layer.health_class``): ``ok`` inside the
#: thresholds, ``warn`` past a warning threshold, ``bad`` past an error threshold,
#: None where no rule judges the layer (``Layer.health_note`` says why), as the
#: JSON report's ``null`` (docs/contract.md section 4).
HEALTH_CLASSES = ("ok", "warn", "bad")
HealthClass = Literal["ok", "warn", "bad"]


@dataclass(frozen=True)
class TraceAttempt:
    """One tracer tried, and why it failed if it did."""

    method: str
    ok: bool
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ok": self.ok, "message": self.message}
