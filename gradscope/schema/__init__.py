"""The JSON Schema of the report (docs/contract.md section 4), shipped inside the package.

CI scripts and gradscope's own tests check reports against the same file, so
the contract is enforced by a machine-readable artefact rather than by prose.
``jsonschema`` is a test/CI dependency only: it is imported when validation is
asked for, never when gradscope merely writes a report.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = ["load_schema", "validate_report"]


@lru_cache(maxsize=1)
def _schema_text() -> str:
    # importlib.resources works from a wheel, a zip or a source checkout alike.
    return resources.files(__name__).joinpath("report.schema.json").read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """A fresh copy of the schema, so callers may modify it without affecting others."""
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


def _where(path: Any) -> str:
    """``$.layers[3].op`` style, which points at the culprit faster than a deque repr."""
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_report(doc: Any) -> None:
    """Raise ``ValueError`` naming every violation at once, not only the first.

    Reporting all of them lets a producer fix a broken report in one round trip.
    """
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "validating a report needs the 'jsonschema' package (pip install jsonschema)"
        ) from exc

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(
        validator.iter_errors(doc),
        key=lambda e: ([str(p) for p in e.absolute_path], e.message),
    )
    if errors:
        lines = [f"{_where(e.absolute_path)}: {e.message}" for e in errors]
        raise ValueError(
            f"report does not match schema_version 1 ({len(errors)} problem(s)):\n"
            + "\n".join(f"  - {line}" for line in lines)
        )
