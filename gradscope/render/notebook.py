"""The report the Python API hands back: a :class:`gradscope.report.Report` that writes its
own files (``report.write_html(path)``, docs/contract.md section 3) and that a Jupyter
notebook shows as the HTML report, inline.

Here, in the renderers' package, not in ``gradscope.report``: the report model sits below
the renderers in the pipeline's layers and never imports them; ``gradscope.analyze`` and
``gradscope.watch`` both return it.
"""

from __future__ import annotations

from pathlib import Path

from gradscope.report import Report


class NotebookReport(Report):
    """A :class:`Report` with its writers, shown inline by Jupyter."""

    def write_html(self, path: str | Path) -> None:
        """The self-contained HTML page (``-`` writes to stdout)."""
        from gradscope.render import write_html

        write_html(self, path)

    def write_json(self, path: str | Path) -> None:
        """The JSON report of docs/contract.md section 4."""
        from gradscope.render import write_json

        write_json(self, path)

    def write_sarif(self, path: str | Path) -> None:
        """SARIF 2.1.0 for code-scanning dashboards."""
        from gradscope.render import write_sarif

        write_sarif(self, path)

    def _repr_html_(self) -> str:
        """The HTML report in an iframe: the same self-contained page (template, charts,
        scripts) as ``--html`` writes, its styles kept to itself, nothing fetched."""
        import html

        from gradscope.render.html import render_html

        page = render_html(self.to_dict())
        return ('<iframe class="gradscope-report" title="gradscope report" '
                'style="width: 100%; height: 760px; border: 1px solid #d0d7de; '
                'border-radius: 6px;" sandbox="allow-scripts allow-popups" '
                'allow="clipboard-write" '
                f'srcdoc="{html.escape(page, quote=True)}"></iframe>')
