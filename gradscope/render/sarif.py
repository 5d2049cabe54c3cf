"""SARIF 2.1.0 output, so code-scanning UIs (GitHub, GitLab, IDEs) show findings inline.

Every registered rule is listed, not only those that fired, so a viewer can
explain a code and a later run's "fixed" results still resolve to a rule.
Output is deterministic for the same document and working directory, which
lets code-scanning services match results across runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gradscope._io import atomic_write_text
from gradscope._version import __version__
from gradscope.records import finding_identity
from gradscope.rules.registry import iter_rules

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"

#: gradscope severities to SARIF result levels (SARIF has no "info"; "note" is its peer).
LEVELS = {"error": "error", "warning": "warning", "info": "note"}


def artifact_uri(file: str, cwd: Path | None = None) -> tuple[str, bool]:
    """The URI for ``file`` and whether it is relative to the source root.

    Files under the working directory become relative, forward-slash URIs so
    the report is portable between checkouts and viewers can map them onto the
    repository; anything else (site-packages, another drive) stays absolute.
    Characters that are not allowed in a URI are percent-encoded.
    """
    base = (cwd or Path.cwd()).resolve()
    path = Path(file)
    absolute = path if path.is_absolute() else base / path
    try:
        relative = absolute.resolve().relative_to(base)
    except (ValueError, OSError):
        return absolute.resolve().as_uri(), False
    return quote(relative.as_posix()), True


def _rules() -> list[dict[str, Any]]:
    rules = []
    for rule in iter_rules():
        rules.append(
            {
                "id": rule.code,
                "name": rule.name,
                "shortDescription": {"text": rule.summary},
                "fullDescription": {"text": rule.what},
                "help": {"text": rule.fix},
                "defaultConfiguration": {"level": LEVELS.get(rule.severity, "warning")},
                "properties": {
                    "category": rule.category,
                    "tags": ["gradient-flow", rule.category],
                    **({"references": list(rule.references)} if rule.references else {}),
                },
            }
        )
    return rules


def _message(finding: Mapping[str, Any]) -> str:
    text = str(finding.get("message", ""))
    recs = finding.get("recommendations") or []
    if recs and recs[0].get("text"):
        text = f"{text.rstrip()} Fix: {recs[0]['text']}"
    return text


def _result(finding: Mapping[str, Any], index: Mapping[str, int], cwd: Path) -> dict[str, Any]:
    loc: Mapping[str, Any] = finding.get("location") or {}
    code = str(finding.get("rule", ""))
    result: dict[str, Any] = {"ruleId": code}
    if code in index:
        result["ruleIndex"] = index[code]
    result["level"] = LEVELS.get(str(finding.get("severity")), "warning")
    result["message"] = {"text": _message(finding)}

    location: dict[str, Any] = {}
    file = loc.get("file")
    if file:
        uri, relative = artifact_uri(str(file), cwd)
        artifact: dict[str, Any] = {"uri": uri}
        if relative:
            artifact["uriBaseId"] = "%SRCROOT%"
        physical: dict[str, Any] = {"artifactLocation": artifact}
        line = loc.get("line")
        if isinstance(line, int) and not isinstance(line, bool) and line >= 1:
            physical["region"] = {"startLine": line}
        location["physicalLocation"] = physical
    module = loc.get("module")
    if module:
        location["logicalLocations"] = [{"fullyQualifiedName": str(module), "kind": "module"}]
    if location:
        result["locations"] = [location]

    # A stable identity for "the same problem at the same place" across runs (the one
    # baselines use), independent of the figures in the message. The file is SARIF's
    # own location, so the fingerprint keeps rule and place, as in its first version.
    _, where, _ = finding_identity(str(code), loc)
    result["partialFingerprints"] = {"gradscopeLocation/v1": f"{code}:{where or ''}"}
    properties: dict[str, Any] = {"category": finding.get("category")}
    if finding.get("evidence"):
        properties["evidence"] = dict(finding["evidence"])
    result["properties"] = properties
    return result


def build_sarif(doc: Mapping[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """The SARIF log as Python objects (exposed for tests and tools that post-process it)."""
    base = cwd or Path.cwd()
    rules = _rules()
    index = {rule["id"]: i for i, rule in enumerate(rules)}
    model: Mapping[str, Any] = doc.get("model") or {}
    version = str(doc.get("gradscope_version") or __version__)
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "gradscope",
                        "version": version,
                        "semanticVersion": version,
                        "rules": rules,
                    }
                },
                "columnKind": "unicodeCodePoints",
                "results": [_result(f, index, base) for f in doc.get("findings") or []],
                "properties": {
                    "status": doc.get("status"),
                    "model": model.get("name"),
                    "schemaVersion": doc.get("schema_version"),
                },
            }
        ],
    }


def render_sarif(doc: Mapping[str, Any]) -> str:
    """SARIF text; NaN is refused like in the JSON report (SARIF is JSON too)."""
    return json.dumps(build_sarif(doc), indent=2, allow_nan=False, ensure_ascii=True) + "\n"


def write_sarif(doc: Mapping[str, Any], path: str | Path) -> None:
    """Write atomically, or to stdout for ``-``."""
    text = render_sarif(doc)
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write_text(path, text)
