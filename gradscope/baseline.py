"""Compare reports: ``analyze --baseline`` and ``gradscope diff``.

A team adopting gradscope on an existing model usually starts with findings it
cannot fix today. Failing CI on them forever teaches people to ignore the tool;
ignoring their rule codes outright hides the next regression of the same kind.
A baseline (a JSON report written earlier) lets CI fail only on what is *new*.

Findings are matched by an identity that survives unrelated edits: the rule
code, the module path (the graph node when there is none) and the basename of
the source file. The message is left out on purpose: it quotes measured
figures that move with every seed or weight change. Line numbers are left out
too: adding an import above the model must not turn every finding into a new
one. A finding also counts as new when the baseline only has it at a less
serious severity (a warning that became an error is a regression).

Nothing here imports torch: reports are compared on CI machines without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gradscope.errors import ConfigError
from gradscope.records import finding_identity, reaches
from gradscope.report import SCHEMA_VERSION, SEVERITIES, Finding, severity_rank

__all__ = [
    "DEFAULT_FACTOR",
    "LayerChange",
    "ReportDiff",
    "SeverityChange",
    "baseline_note",
    "diff",
    "finding_key",
    "load_report",
    "new_findings",
    "render_diff",
]

#: A layer's gradient RMS must move by more than this factor (either way) to be listed:
#: 2x is 0.3 decades, well above the run-to-run noise of the probe on a fixed seed.
DEFAULT_FACTOR = 2.0

#: Layer changes printed by :func:`render_diff` (the largest first); the rest are counted.
LAYERS_SHOWN = 20

FindingKey = tuple[str, str | None, str | None]
F = TypeVar("F", Finding, Mapping[str, Any])

_HINT = "write one with 'gradscope analyze MODEL --json PATH'"


# ------------------------------------------------------------------ loading


def load_report(path: str | Path, what: str = "report") -> dict[str, Any]:
    """Read a JSON report written by ``gradscope analyze --json``; exit-2 errors otherwise.

    Only the parts comparisons rely on are checked (schema version, findings
    with a rule, severity and location, layers with a name): a report from a
    newer gradscope with extra keys still compares, one from an incompatible
    schema is refused rather than silently matching nothing.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist", _HINT) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {p} is a directory, not a JSON report", _HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"cannot read {what} {p}: {reason}", _HINT) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {p} is not valid JSON (line {exc.lineno}, column "
                          f"{exc.colno}: {exc.msg})", _HINT) from None
    _check_report(doc, f"{what} {p}")
    return doc  # type: ignore[no-any-return]


def _check_report(doc: Any, where: str) -> None:
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise ConfigError(f"{where} is not a gradscope JSON report (no schema_version)", _HINT)
    version = doc["schema_version"]
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{where} has schema_version {version!r}; this gradscope reads "
                          f"version {SCHEMA_VERSION}", "re-create it with this gradscope")
    findings = doc.get("findings")
    if not isinstance(findings, list):
        raise ConfigError(f"{where} has no findings list", _HINT)
    for i, f in enumerate(findings):
        if (not isinstance(f, dict) or not isinstance(f.get("rule"), str)
                or f.get("severity") not in SEVERITIES
                or not isinstance(f.get("location", {}), dict)):
            raise ConfigError(f"{where}: findings[{i}] lacks a rule, severity or location",
                              _HINT)
    layers = doc.get("layers", [])
    if not isinstance(layers, list) or not all(
            isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers):
        raise ConfigError(f"{where}: layers must be a list of records with a name", _HINT)


# ------------------------------------------------------------------ finding identity


def _as_dict(finding: Finding | Mapping[str, Any]) -> Mapping[str, Any]:
    return finding.to_dict() if isinstance(finding, Finding) else finding


def finding_key(finding: Finding | Mapping[str, Any]) -> FindingKey:
    """(rule, module or node, file basename): what "the same finding" means across runs.

    Not the message (its figures change), not the line (unrelated edits move
    it), not the directory (CI checkouts and laptops differ).
    """
    d = _as_dict(finding)
    return finding_identity(str(d.get("rule")), d.get("location") or {})


def _match(known: Iterable[Finding | Mapping[str, Any]], current: Sequence[F],
           any_severity: bool = False) -> tuple[list[F], list[tuple[Mapping[str, Any], F]]]:
    """Pair ``current`` findings with ``known`` ones of the same identity.

    Returns (unmatched current findings, (known, current) pairs). A known finding
    covers one current finding (so a second GS101 at the same module is new) at
    its own severity or a milder one. The most serious current findings are
    paired first, each with the mildest known finding that still covers it, so
    no serious finding goes unmatched because a milder one took its partner.
    ``any_severity``: pair regardless of severity (the closest one), for diffs,
    which report a re-graded finding as a severity change, not as added/removed.
    """
    pool: dict[FindingKey, list[Mapping[str, Any]]] = {}
    for k in known:
        pool.setdefault(finding_key(k), []).append(_as_dict(k))
    unmatched: list[F] = []
    pairs: list[tuple[Mapping[str, Any], F]] = []
    order = sorted(range(len(current)),
                   key=lambda i: severity_rank(_as_dict(current[i])["severity"]))
    for i in order:
        finding = current[i]
        rank = severity_rank(_as_dict(finding)["severity"])
        candidates = [k for k in pool.get(finding_key(finding), [])
                      if any_severity or severity_rank(k["severity"]) <= rank]
        if not candidates:
            unmatched.append(finding)
            continue
        if any_severity:
            best = min(candidates, key=lambda k: abs(severity_rank(k["severity"]) - rank))
        else:
            best = max(candidates, key=lambda k: severity_rank(k["severity"]))
        pool[finding_key(finding)].remove(best)
        pairs.append((best, finding))
    keep = {id(f) for f in unmatched}
    return [f for f in current if id(f) in keep], pairs


def new_findings(baseline_doc: Mapping[str, Any], findings: Sequence[F]) -> list[F]:
    """The findings of ``findings`` that the baseline report does not already have.

    Order is kept. A finding is known when the baseline has one of the same
    :func:`finding_key` at the same or a more serious severity.
    """
    return _match(baseline_doc.get("findings") or [], findings)[0]


def fails(findings: Iterable[Finding | Mapping[str, Any]], fail_on: str) -> bool:
    """Whether a finding at or above ``fail_on`` is among ``findings`` (``never``: no)."""
    return any(reaches(_as_dict(f)["severity"], fail_on) for f in findings)


def baseline_note(path: str | Path, findings: Sequence[Finding | Mapping[str, Any]],
                  new: Sequence[Finding | Mapping[str, Any]]) -> str:
    """The report note saying how many findings the baseline explained away.

    The terminal and every report still show all findings; the note is how a
    reader learns why the exit code ignored some of them.
    """
    known = len(findings) - len(new)
    text = (f"baseline {path}: {known} finding{'s' if known != 1 else ''} known, "
            f"{len(new)} new")
    if new:
        codes = ", ".join(dict.fromkeys(str(_as_dict(f)["rule"]) for f in new))
        text += f" ({codes}); only new findings decide the exit code"
    return text


# ------------------------------------------------------------------ diff


@dataclass(frozen=True)
class SeverityChange:
    """A finding present in both reports whose severity moved."""

    before: Mapping[str, Any]
    after: Mapping[str, Any]

    @property
    def worse(self) -> bool:
        return severity_rank(self.after["severity"]) < severity_rank(self.before["severity"])

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.after["rule"], "location": self.after.get("location"),
                "before": self.before["severity"], "after": self.after["severity"]}


@dataclass(frozen=True)
class LayerChange:
    """One layer whose gradient RMS moved by more than the diff's factor."""

    name: str
    module: str | None
    op: str | None
    metric: str  # "probe_grad_rms" or "static_grad_rms"
    before: float
    after: float

    @property
    def factor(self) -> float:
        """after / before; inf when the gradient appeared from zero, 0 when it vanished."""
        if self.before == 0:
            return math.inf
        return self.after / self.before

    @property
    def decades(self) -> float:
        """|log10(after / before)|: how far it moved, for sorting the biggest first."""
        if self.before == 0 or self.after == 0:
            return math.inf
        return abs(math.log10(self.after / self.before))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module, "op": self.op, "metric": self.metric,
                "before": self.before, "after": self.after}


@dataclass
class ReportDiff:
    """What changed between two reports of (presumably) the same model."""

    status_before: str | None
    status_after: str | None
    added: list[Mapping[str, Any]] = field(default_factory=list)
    removed: list[Mapping[str, Any]] = field(default_factory=list)
    severity_changed: list[SeverityChange] = field(default_factory=list)
    layer_changes: list[LayerChange] = field(default_factory=list)
    layers_added: int = 0
    layers_removed: int = 0
    factor: float = DEFAULT_FACTOR

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.severity_changed or self.layer_changes
                    or self.layers_added or self.layers_removed
                    or self.status_before != self.status_after)

    def new(self) -> list[Mapping[str, Any]]:
        """Added findings plus the ones whose severity got worse: what CI should fail on."""
        return self.added + [c.after for c in self.severity_changed if c.worse]

    def fails(self, fail_on: str) -> bool:
        """Whether a new (or worsened) finding is at or above ``fail_on``."""
        return fails(self.new(), fail_on)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": {"before": self.status_before, "after": self.status_after},
            "added": [dict(f) for f in self.added],
            "removed": [dict(f) for f in self.removed],
            "severity_changed": [c.to_dict() for c in self.severity_changed],
            "layer_changes": [c.to_dict() for c in self.layer_changes],
            "layers_added": self.layers_added,
            "layers_removed": self.layers_removed,
            "factor": self.factor,
        }


def _pair_layers(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
                 ) -> tuple[list[tuple[Mapping[str, Any], Mapping[str, Any]]], int, int]:
    """Pair layers by name (same op), then by (module, op) where that is unique on both sides.

    Node names are stable while the graph is unchanged; once a layer is inserted,
    fx renumbers its neighbours (``relu_3`` becomes ``relu_4``), which the module
    path and op still identify.
    """
    by_name = {layer["name"]: layer for layer in old}
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    used_old: set[str] = set()
    rest_new: list[Mapping[str, Any]] = []
    for layer in new:
        match = by_name.get(layer["name"])
        if match is not None and match.get("op") == layer.get("op"):
            pairs.append((match, layer))
            used_old.add(match["name"])
        else:
            rest_new.append(layer)
    rest_old = [layer for layer in old if layer["name"] not in used_old]

    def groups(layers: Sequence[Mapping[str, Any]]
               ) -> dict[tuple[Any, Any], list[Mapping[str, Any]]]:
        out: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
        for layer in layers:
            if layer.get("module") is not None:
                out.setdefault((layer.get("module"), layer.get("op")), []).append(layer)
        return out

    old_groups, new_groups = groups(rest_old), groups(rest_new)
    matched = 0
    for key, members in new_groups.items():
        others = old_groups.get(key, [])
        if len(members) == 1 and len(others) == 1:
            pairs.append((others[0], members[0]))
            matched += 1
    return pairs, len(rest_new) - matched, len(rest_old) - matched


def _moved(before: Any, after: Any, factor: float) -> bool:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return False
    if before == after:
        return False
    if before <= 0 or after <= 0:
        return True  # a gradient that appeared or vanished entirely
    return abs(math.log10(after / before)) > math.log10(factor)


def diff(old_doc: Mapping[str, Any], new_doc: Mapping[str, Any],
         factor: float = DEFAULT_FACTOR) -> ReportDiff:
    """Findings added, removed or re-graded, and layers whose gradient RMS moved > ``factor``.

    Layer figures are the raw ``probe_grad_rms`` and ``static_grad_rms`` of the
    JSON report; both reports should use the same probe loss for the probe
    figures to be comparable.
    """
    if factor <= 1:
        raise ConfigError(f"the layer factor must be above 1, not {factor}")
    old_findings = list(old_doc.get("findings") or [])
    new_list = list(new_doc.get("findings") or [])
    added, pairs = _match(old_findings, new_list, any_severity=True)
    paired_old = {id(old) for old, _ in pairs}
    removed = [f for f in old_findings if id(f) not in paired_old]
    changes = [SeverityChange(before=old, after=new) for old, new in pairs
               if old["severity"] != new["severity"]]
    layer_pairs, layers_added, layers_removed = _pair_layers(
        old_doc.get("layers") or [], new_doc.get("layers") or [])
    moved: list[LayerChange] = []
    for before, after in layer_pairs:
        for metric in ("probe_grad_rms", "static_grad_rms"):
            if _moved(before.get(metric), after.get(metric), factor):
                moved.append(LayerChange(
                    name=str(after["name"]), module=after.get("module"), op=after.get("op"),
                    metric=metric, before=float(before[metric]), after=float(after[metric])))
    return ReportDiff(status_before=old_doc.get("status"), status_after=new_doc.get("status"),
                      added=added, removed=removed, severity_changed=changes,
                      layer_changes=moved, layers_added=layers_added,
                      layers_removed=layers_removed, factor=factor)


# ------------------------------------------------------------------ text


def _num(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return "0" if value == 0 else f"{value:.3g}"


def _finding_line(f: Mapping[str, Any]) -> str:
    from gradscope.render.terminal import clean, location_text

    return (f"{clean(f.get('rule'))} {clean(f.get('severity'))} at "
            f"{location_text(f.get('location'))}: {clean(f.get('message'))}")


def render_diff(result: ReportDiff, old_name: str = "old", new_name: str = "new") -> str:
    """The diff as plain text, one line per change (ASCII ``->``, safe on any console)."""
    from gradscope.render.terminal import clean

    lines = [f"gradscope diff {clean(old_name)} -> {clean(new_name)}"]
    if result.status_before == result.status_after:
        lines.append(f"status: {clean(result.status_after)} (unchanged)")
    else:
        lines.append(f"status: {clean(result.status_before)} -> {clean(result.status_after)}")
    if result.empty:
        lines.append("no changes")
        return "\n".join(lines) + "\n"
    sections = (("added findings", result.added), ("removed findings", result.removed))
    for title, items in sections:
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {'+' if title.startswith('added') else '-'} {_finding_line(f)}"
                         for f in items)
    if result.severity_changed:
        lines.append(f"severity changed ({len(result.severity_changed)}):")
        for c in result.severity_changed:
            lines.append(f"  {'!' if c.worse else '~'} {clean(c.after['rule'])} "
                         f"{clean(c.before['severity'])} -> {clean(c.after['severity'])}: "
                         f"{_finding_line(c.after)}")
    if result.layer_changes:
        # One line per layer (probe and static figures together), the largest move first.
        by_layer: dict[str, list[LayerChange]] = {}
        for change in result.layer_changes:
            by_layer.setdefault(change.name, []).append(change)
        ordered = sorted(by_layer.values(), key=lambda cs: -max(c.decades for c in cs))
        lines.append(f"layers whose gradient RMS moved more than {result.factor:g}x "
                     f"({len(ordered)}):")
        for changes in ordered[:LAYERS_SHOWN]:
            first = changes[0]
            what = ", ".join(clean(p) for p in (first.module, first.op) if p)
            figures = "; ".join(
                f"{c.metric.removesuffix('_grad_rms')} {_num(c.before)} -> {_num(c.after)} "
                f"({'from 0' if math.isinf(c.factor) else f'x{_num(c.factor)}'})"
                for c in changes)
            lines.append(f"  {clean(first.name)}{f' ({what})' if what else ''}: {figures}")
        if len(ordered) > LAYERS_SHOWN:
            lines.append(f"  ... and {len(ordered) - LAYERS_SHOWN} more")
    if result.layers_added or result.layers_removed:
        lines.append(f"layers: {result.layers_added} added, {result.layers_removed} removed")
    return "\n".join(lines) + "\n"
