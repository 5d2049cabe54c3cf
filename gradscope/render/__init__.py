"""Renderers: turn a report into JSON, HTML, SARIF and terminal text.

They read the plain dictionary of :meth:`gradscope.report.Report.to_dict` (a
:class:`~gradscope.report.Report` is accepted too and turned into it) and never
import torch. They are the last stage of the pipeline: the report model does
not know them, so ``write_*`` live here, not on ``Report``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any


def as_document(report: Any) -> dict[str, Any]:
    """The report's JSON document: ``report.to_dict()`` for a Report, the dict itself else."""
    to_dict = getattr(report, "to_dict", None)
    return to_dict() if callable(to_dict) else report  # type: ignore[no-any-return]


def write_json(report: Any, path: str | Path) -> None:
    """Write the JSON report of a Report or its document to ``path`` (``-``: stdout)."""
    from gradscope.render.json_report import write_json as write

    write(as_document(report), path)


def write_html(report: Any, path: str | Path) -> None:
    """Write the self-contained HTML report of a Report or its document to ``path``."""
    from gradscope.render.html import write_html as write

    write(as_document(report), path)


def write_sarif(report: Any, path: str | Path) -> None:
    """Write the SARIF 2.1.0 log of a Report or its document to ``path``."""
    from gradscope.render.sarif import write_sarif as write

    write(as_document(report), path)


__all__ = ["as_document", "write_html", "write_json", "write_sarif"]
