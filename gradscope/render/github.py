"""GitHub Actions workflow commands: one annotation per finding (``--format github``).

A finding becomes ``::error file=PATH,line=N,title=GS101 name::MESSAGE``
(``::warning`` for warnings, ``::notice`` for info), which the runner shows on
the pull request's diff and in the job summary. Messages and paths come from
user code and exception text, so they are escaped the way the runner
unescapes them: in the message ``%`` -> ``%25``, CR -> ``%0D``, LF -> ``%0A``;
in a property also ``:`` -> ``%3A`` and ``,`` -> ``%2C``. A newline can then
never start a second, forged command (``::add-mask::``, ``::stop-commands::``),
and ANSI sequences and other control characters are dropped first, as in the
terminal output. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradscope.render.text import ANSI_RE, BREAKS, controls_except

#: gradscope severities to workflow commands (GitHub has no "info"; "notice" is its peer).
COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}

# Line breaks other than CR/LF become spaces; the other controls (gradscope.render.text)
# are dropped. CR and LF are kept here and escaped afterwards, as GitHub reads them.
_OTHER_BREAKS_RE = re.compile("[" + BREAKS.replace("\r", "").replace("\n", "") + "]")
_CTRL_RE = controls_except(BREAKS)


def _sanitize(value: Any) -> str:
    text = "" if value is None else str(value)
    text = ANSI_RE.sub("", text)
    text = _OTHER_BREAKS_RE.sub(" ", text)
    return _CTRL_RE.sub("", text)


def escape_data(value: Any) -> str:
    """A command's message: ``%``, CR and LF percent-encoded (``%`` first)."""
    return (_sanitize(value).replace("%", "%25").replace("\r", "%0D")
            .replace("\n", "%0A"))


def escape_property(value: Any) -> str:
    """A command's property value: as a message, plus ``:`` and ``,``."""
    return escape_data(value).replace(":", "%3A").replace(",", "%2C")


def display_path(file: str, cwd: Path | None = None) -> str:
    """Relative to the working directory (forward slashes) when under it, else as given."""
    base = (cwd or Path.cwd()).resolve()
    try:
        path = Path(file)
        absolute = (path if path.is_absolute() else base / path).resolve()
        return absolute.relative_to(base).as_posix()
    except (OSError, ValueError):
        return file


def _rule_names() -> dict[str, str]:
    from gradscope.rules.registry import iter_rules

    return {rule.code: rule.name for rule in iter_rules()}


def _message(finding: Mapping[str, Any]) -> str:
    """The finding's message (it names the module) and its first fix, as in SARIF."""
    text = str(finding.get("message", "")).rstrip()
    recs = finding.get("recommendations") or []
    if recs and recs[0].get("text"):
        text = f"{text} Fix: {recs[0]['text']}"
    return text


def annotation(finding: Mapping[str, Any], names: Mapping[str, str] | None = None,
               cwd: Path | None = None, model_file: str | None = None) -> str:
    """One workflow command line (no trailing newline) for one finding.

    A finding without a source line of its own (a layer built by ``nn.Sequential``)
    is pinned to the model's file, ``model_file``, with no line; neither known: no
    ``file=``/``line=`` (the annotation then shows in the run's summary only).
    """
    names = _rule_names() if names is None else names
    command = COMMANDS.get(str(finding.get("severity")), "warning")
    loc: Mapping[str, Any] = finding.get("location") or {}
    props: list[str] = []
    file, line = loc.get("file"), loc.get("line")
    if not file:
        file, line = model_file, None
    if file:
        props.append(f"file={escape_property(display_path(str(file), cwd))}")
        if isinstance(line, int) and not isinstance(line, bool) and line >= 1:
            props.append(f"line={line}")
    code = str(finding.get("rule", ""))
    title = f"{code} {names[code]}" if code in names else code
    props.append(f"title={escape_property(title)}")
    return f"::{command} {','.join(props)}::{escape_data(_message(finding))}"


def render_github(doc: Mapping[str, Any], cwd: Path | None = None) -> str:
    """Every finding of a report as a workflow command, one per line."""
    findings = doc.get("findings") or []
    if not findings:
        return ""
    names = _rule_names()
    model: Mapping[str, Any] = doc.get("model") or {}
    source = model.get("source")
    model_file = str(source) if isinstance(source, str) and source.endswith(".py") else None
    return "".join(annotation(f, names, cwd, model_file) + "\n" for f in findings)
