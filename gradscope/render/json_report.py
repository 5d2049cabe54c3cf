"""The JSON report (docs/contract.md section 4): the machine-readable form CI scripts parse.

Output is byte-for-byte reproducible for the same document, so reports can
be diffed and cached: key order is the order ``Report.to_dict`` builds, never
re-sorted, and nothing time- or machine-dependent is added here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gradscope._io import atomic_write_text


def render_json(doc: dict[str, Any]) -> str:
    """Serialise ``doc``; refuse NaN/Infinity instead of writing invalid JSON.

    ``Report.to_dict`` has already turned non-finite floats into ``null`` with a
    note, so a non-finite value reaching this point is a bug in the caller and
    fails loudly rather than producing a file strict parsers reject. ASCII-only
    output survives any console encoding when written to stdout.
    """
    try:
        text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False, ensure_ascii=True)
    except ValueError as exc:
        raise ValueError(
            f"report contains a non-finite float ({exc}); build it with Report.to_dict()"
        ) from exc
    return text + "\n"


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    """Write the JSON report to ``path``, or to stdout when ``path`` is ``-``."""
    text = render_json(doc)
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write_text(path, text)
