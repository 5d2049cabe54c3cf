"""The Jinja environment of the HTML report: where the templates are, autoescaping, and
model strings' control characters made visible. Shared by the report page
(``gradscope.render.html``) and its fragments (``gradscope.render.graph_view``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from gradscope.render.text import controls_except

#: The page template; the fragments sit beside it.
TEMPLATE_NAME = "report.html.j2"


def template_dirs() -> list[Path]:
    """Where the template may live: inside an installed wheel first, then a source checkout.

    The wheel build copies the top-level ``templates/`` into the package; in a
    checkout or editable install it sits next to the package instead.
    """
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "templates", here.parents[2] / "templates"]
    return [d for d in candidates if (d / TEMPLATE_NAME).is_file()]


#: The controls of gradscope.render.text but tab and newline, shown as Unicode
#: control pictures or code points: an ESC or a right-to-left override in a module
#: name must be seen, not interpreted (or silently reorder the text).
_CONTROLS = controls_except("\t\n")


def _picture(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\x7f":
        return "\u2421"
    if ord(char) < 0x20:
        return chr(0x2400 + ord(char))
    return f"<U+{ord(char):04X}>"


def visible_controls(value: Any) -> Any:
    """Jinja's ``finalize``: every printed string has its control characters made visible.

    Runs before autoescaping, so the replacement is escaped like the rest.
    """
    if isinstance(value, str) and not hasattr(value, "__html__"):
        return _CONTROLS.sub(_picture, value)
    return value


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The one Jinja environment of the HTML report and its fragments (autoescaped)."""
    dirs = template_dirs()
    if not dirs:
        raise RuntimeError(
            f"gradscope's HTML templates ({TEMPLATE_NAME}) are missing; the installation is "
            "incomplete (reinstall gradscope)"
        )
    return Environment(
        loader=FileSystemLoader([str(d) for d in dirs]),
        # default=True: escape even if the template is ever renamed.
        autoescape=select_autoescape(
            enabled_extensions=("html", "htm", "xml", "j2"), default_for_string=True, default=True
        ),
        undefined=StrictUndefined,
        finalize=visible_controls,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
