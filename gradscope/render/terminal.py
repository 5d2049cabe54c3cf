"""The CLI's default output: a verdict, a few headline figures, one line per finding.

Module names, file paths and messages come from user code and exception
text. Printed raw, a name containing an ANSI sequence could recolour, hide or
rewrite the terminal's content (or a CI log), and a newline could forge a
fake "healthy" line. Every such string therefore goes through :func:`clean`
before it is printed; colour codes are only ever added by this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradscope.render.text import ANSI_RE, BREAKS, CONTROL_RE

_SEVERITY_ORDER = ("error", "warning", "info")

# What may not be printed raw is defined once (gradscope.render.text): escape
# sequences are removed whole, line breaks become a space so words stay apart, and
# every other control character is dropped.
_ANSI_RE = ANSI_RE
_WHITESPACE_CTRL_RE = re.compile(f"[{BREAKS}]+")
_CTRL_RE = CONTROL_RE

_RESET = "\x1b[0m"
_STYLES = {
    "bold": "\x1b[1m",
    "dim": "\x1b[2m",
    "red": "\x1b[31m",
    "green": "\x1b[32m",
    "yellow": "\x1b[33m",
    "cyan": "\x1b[36m",
}
_STATUS_STYLE = {"healthy": ("bold", "green"), "warning": ("bold", "yellow"),
                 "unhealthy": ("bold", "red")}
_SEVERITY_STYLE = {"error": ("bold", "red"), "warning": ("yellow",), "info": ("cyan",)}


def clean(value: Any) -> str:
    """Make a model-derived value safe to print on one terminal line."""
    text = "" if value is None else str(value)
    text = _ANSI_RE.sub("", text)
    text = _WHITESPACE_CTRL_RE.sub(" ", text)
    return _CTRL_RE.sub("", text)


def _style(text: str, styles: Sequence[str], color: bool) -> str:
    if not color or not styles:
        return text
    return "".join(_STYLES[s] for s in styles) + text + _RESET


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return "0" if value == 0 else f"{value:.2e}"
    return clean(value)


def _display_path(file: str) -> str:
    """Paths under the working directory print relative: shorter, and clickable in IDEs."""
    try:
        path = Path(file)
        if path.is_absolute():
            cwd = Path.cwd()
            return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else file
    except (OSError, ValueError):
        pass
    return file


def location_text(location: Mapping[str, Any] | None) -> str:
    """``file:line (module)``, or whatever part of it is known."""
    loc = location or {}
    parts = []
    file, line, module, node = (loc.get(k) for k in ("file", "line", "module", "node"))
    if file:
        shown = _display_path(str(file))
        parts.append(f"{shown}:{line}" if line else shown)
    if module:
        parts.append(f"({module})" if parts else str(module))
    elif node and not parts:
        parts.append(str(node))
    return clean(" ".join(parts)) if parts else "<model>"


def _extreme(layers: Sequence[Mapping[str, Any]], key: str) -> tuple[float, str] | None:
    """The layer value furthest from 1 on a log scale: the worst vanishing or exploding."""
    best: tuple[float, float, str] | None = None
    for layer in layers:
        value = layer.get(key)
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ):
            distance = abs(math.log10(value))
            if best is None or distance > best[0]:
                best = (distance, float(value), str(layer.get("name", "")))
    return None if best is None else (best[1], best[2])


def _ratio_rows(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Headline gradient ratios: the analysis's own ``summary`` first, layer extremes else.

    ``summary`` keys belong to the rules engine and may grow, so any key that
    names a ratio or a worst case is shown rather than a fixed list.
    """
    summary: Mapping[str, Any] = doc.get("summary") or {}
    rows = [
        (clean(k).replace("_", " "), _num(v))
        for k, v in summary.items()
        if "ratio" in str(k) or "worst" in str(k)
    ]
    joined = " ".join(label for label, _ in rows)
    layers: Sequence[Mapping[str, Any]] = doc.get("layers") or []
    if "static" not in joined and "probe" not in joined:
        # The judged layers' health, the figure the verdict used (never a raw RMS).
        judged = [layer for layer in layers if layer.get("health_class") in ("ok", "warn", "bad")]
        found = _extreme(judged, "health")
        if found is not None:
            rows.append(("worst judged", f"{_num(found[0])} at {clean(found[1])}"))
    return rows


def _summary_rows(doc: Mapping[str, Any], color: bool) -> list[tuple[str, str]]:
    model: Mapping[str, Any] = doc.get("model") or {}
    trace: Mapping[str, Any] = model.get("trace") or {}
    probe: Mapping[str, Any] | None = doc.get("probe")
    findings: Sequence[Mapping[str, Any]] = doc.get("findings") or []

    params = _num(model.get("num_parameters"))
    trainable = model.get("num_trainable_parameters")
    if trainable is not None and trainable != model.get("num_parameters"):
        params += f" ({_num(model['num_trainable_parameters'])} trainable)"
    rows = [("parameters", params)]

    trace_text = clean(trace.get("method", "?")) or "?"
    if trace.get("ok") is False:
        trace_text += " (failed)"
    coverage = trace.get("coverage")
    if isinstance(coverage, (int, float)) and not isinstance(coverage, bool):
        trace_text += f", coverage {coverage * 100:.0f}%"
        if trace.get("num_nodes"):
            trace_text += f" of {_num(trace['num_nodes'])} nodes"
    rows.append(("trace", trace_text))

    if probe is None or not probe.get("enabled"):
        rows.append(("probe", "off (static analysis only)"))
    else:
        probe_text = clean(probe.get("device") or model.get("device") or "?")
        if probe.get("batch_size"):
            probe_text += f", batch {_num(probe['batch_size'])}"
        rows.append(("probe", probe_text))
    rows.extend(_ratio_rows(doc))

    counts = ", ".join(
        _style(
            f"{sum(1 for f in findings if f.get('severity') == sev)} {sev}",
            _SEVERITY_STYLE[sev] if any(f.get("severity") == sev for f in findings) else (),
            color,
        )
        for sev in _SEVERITY_ORDER
    )
    rows.append(("findings", counts))
    return rows


def _severity_key(indexed: tuple[int, Mapping[str, Any]]) -> tuple[int, str, int]:
    index, finding = indexed
    sev = str(finding.get("severity"))
    rank = _SEVERITY_ORDER.index(sev) if sev in _SEVERITY_ORDER else len(_SEVERITY_ORDER)
    return rank, str(finding.get("rule", "")), index


#: Notes printed under the findings; the rest are in the JSON/HTML report.
NOTES_SHOWN = 5


def render_terminal(doc: dict[str, Any], color: bool) -> str:
    """The text the CLI prints.

    ``color`` is the caller's decision (isatty, NO_COLOR, --no-color) because
    only the CLI knows where the text is going.
    """
    model: Mapping[str, Any] = doc.get("model") or {}
    status = str(doc.get("status", ""))
    lines = [
        f"{_style('gradscope', ('bold',), color)} {clean(model.get('name', 'model'))}: "
        + _style(clean(status).upper() or "UNKNOWN", _STATUS_STYLE.get(status, ()), color)
    ]
    rows = _summary_rows(doc, color)
    width = max(len(label) for label, _ in rows)
    lines.extend(
        f"  {_style(label.ljust(width), ('dim',), color)}  {value}" for label, value in rows
    )

    findings: Sequence[Mapping[str, Any]] = doc.get("findings") or []
    if findings:
        lines.append("")
    sev_width = max(len(s) for s in _SEVERITY_ORDER)
    for _, finding in sorted(enumerate(findings), key=_severity_key):
        sev = clean(finding.get("severity", ""))
        head = _style(sev.upper().ljust(sev_width), _SEVERITY_STYLE.get(sev, ()), color)
        rule = _style(clean(finding.get("rule", "")), ("bold",), color)
        where = location_text(finding.get("location"))
        lines.append(f"{head} {rule} {where}: {clean(finding.get('message', ''))}")
        recs = finding.get("recommendations") or []
        if recs:
            lines.append(f"    {_style('fix:', ('dim',), color)} {clean(recs[0].get('text', ''))}")
    notes = [clean(str(n)) for n in doc.get("notes") or []]
    if notes:  # e.g. findings suppressed by --ignore: the exit code depends on them
        lines.append("")
        lines.extend(f"{_style('note:', ('dim',), color)} {n}" for n in notes[:NOTES_SHOWN])
        if len(notes) > NOTES_SHOWN:
            lines.append(f"{_style('note:', ('dim',), color)} ... and {len(notes) - NOTES_SHOWN} "
                         "more in the JSON/HTML report")
    return "\n".join(lines) + "\n"
