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


def _steps_rows(steps: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A watched run's summary: what was watched, and loss and gradient norm first to last."""
    rows = [("watched", f"{_num(steps.get('steps'))} step(s) of {clean(steps.get('optimizer'))}"
                        f" (lr {_num(steps.get('lr'))}), modules every "
                        f"{_num(steps.get('every'))}th step")]
    for label, key in (("loss", "losses"), ("grad norm", "grad_norms")):
        values = [v for v in steps.get(key) or [] if isinstance(v, (int, float))
                  and math.isfinite(v)]
        if values:
            rows.append((label, f"{_num(values[0])} at step 0 -> {_num(values[-1])} at the "
                                "last finite step"))
    if steps.get("first_nonfinite_step") is not None:
        rows.append(("non-finite", f"from step {_num(steps['first_nonfinite_step'])}"))
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
    steps: Mapping[str, Any] | None = doc.get("steps")
    if isinstance(steps, Mapping):  # a watched training run: its steps replace the trace
        rows.extend(_steps_rows(steps))
    else:
        rows.append(("trace", trace_text))

    if isinstance(steps, Mapping):
        pass  # no before-training probe: the steps above are the measurement
    elif probe is None or not probe.get("enabled"):
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


#: Width when the terminal's is unknown (a pipe, a CI log): the classic 80 columns.
DEFAULT_WIDTH = 80


def _wrap(first: str, first_styled: str, body: str, width: int, indent: int) -> list[str]:
    """``first`` (plain, as printed ``first_styled``) then ``body`` wrapped to ``width``
    columns, continuation lines indented by ``indent``. Lengths are counted on the plain
    text, so colour codes never push a line over the width."""
    import textwrap

    avail = max(width - len(first), 20)
    rest = max(width - indent, 20)
    head, *tail = textwrap.wrap(body, width=avail, break_on_hyphens=False) or [""]
    lines = [first_styled + head]
    if tail:
        lines.extend(" " * indent + line for line in
                     textwrap.wrap(" ".join(tail), width=rest, break_on_hyphens=False))
    return lines


def _fix_key(rec: Mapping[str, Any]) -> str:
    """What makes two findings' fixes the same fix: its action, else its text."""
    action = rec.get("action")
    if action:
        import json

        return json.dumps(action, sort_keys=True)
    return clean(rec.get("text", ""))


def render_terminal(doc: dict[str, Any], color: bool, width: int | None = None) -> str:
    """The text the CLI prints, no line wider than ``width`` columns (80 by default).

    ``color`` and ``width`` are the caller's decision (isatty, NO_COLOR, --no-color, the
    terminal's size) because only the CLI knows where the text is going. Every fix of a
    finding is printed; a fix that several findings share (one re-initialisation for
    three sigmoid findings) is printed once, numbered, and referred to after that.
    """
    width = max(int(width or DEFAULT_WIDTH), 40)
    model: Mapping[str, Any] = doc.get("model") or {}
    status = str(doc.get("status", ""))
    name = clean(model.get("name", "model"))
    verdict = clean(status).upper() or "UNKNOWN"
    lines = _wrap("gradscope ", _style("gradscope", ("bold",), color) + " ",
                  f"{name}: {verdict}", width, 2)
    if color:  # the verdict's colour, on whichever line it ended
        lines[-1] = lines[-1][:len(lines[-1]) - len(verdict)] + _style(
            verdict, _STATUS_STYLE.get(status, ()), color)
    rows = _summary_rows(doc, False)
    styled_rows = dict(_summary_rows(doc, color))
    label_width = max(len(label) for label, _ in rows)
    for label, value in rows:
        first = f"  {label.ljust(label_width)}  "
        styled_first = f"  {_style(label.ljust(label_width), ('dim',), color)}  "
        wrapped = _wrap(first, styled_first, value, width, len(first))
        if color and len(wrapped) == 1:  # coloured counts: only when they fit as they are
            wrapped = [styled_first + styled_rows[label]]
        lines.extend(wrapped)

    findings: Sequence[Mapping[str, Any]] = doc.get("findings") or []
    if findings:
        lines.append("")
    sev_width = max(len(s) for s in _SEVERITY_ORDER)
    shared: dict[str, int] = {}  # fix -> its number, for fixes printed once
    counts: dict[str, int] = {}
    for finding in findings:
        for rec in finding.get("recommendations") or []:
            counts[_fix_key(rec)] = counts.get(_fix_key(rec), 0) + 1
    for _, finding in sorted(enumerate(findings), key=_severity_key):
        sev = clean(finding.get("severity", ""))
        rule = clean(finding.get("rule", ""))
        first = f"{sev.upper().ljust(sev_width)} {rule} "
        styled = (f"{_style(sev.upper().ljust(sev_width), _SEVERITY_STYLE.get(sev, ()), color)}"
                  f" {_style(rule, ('bold',), color)} ")
        where = location_text(finding.get("location"))
        lines.extend(_wrap(first, styled, f"{where}: {clean(finding.get('message', ''))}",
                           width, 4))
        recs = finding.get("recommendations") or []
        for number, rec in enumerate(recs, 1):
            label = "fix:" if len(recs) == 1 else f"fix {number}:"
            key = _fix_key(rec)
            if key in shared:
                text = f"the same as fix [{shared[key]}] above."
            else:
                text = clean(rec.get("text", ""))
                measured = rec.get("measured")
                if isinstance(measured, Mapping):  # trained on a copy: say what it gave
                    text += (f" (measured: {_num(measured.get('before'))} -> "
                             f"{_num(measured.get('after'))}, "
                             f"{clean(measured.get('metric', ''))})")
                if counts.get(key, 0) > 1:
                    shared[key] = len(shared) + 1
                    text = f"[{shared[key]}] {text}"
            first = f"    {label} "
            lines.extend(_wrap(first, f"    {_style(label, ('dim',), color)} ", text, width, 6))
    notes = [clean(str(n)) for n in doc.get("notes") or []]
    if notes:  # e.g. findings suppressed by --ignore: the exit code depends on them
        lines.append("")
        shown = notes[:NOTES_SHOWN]
        if len(notes) > NOTES_SHOWN:
            shown.append(f"... and {len(notes) - NOTES_SHOWN} more in the JSON/HTML report")
        for note in shown:
            lines.extend(_wrap("note: ", f"{_style('note:', ('dim',), color)} ", note, width, 6))
    return "\n".join(lines) + "\n"
