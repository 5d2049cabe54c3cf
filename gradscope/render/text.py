"""What a model-derived string may not carry into any output, defined once for all renderers.

Module names, messages and file paths come from the user's model and can hold
anything: ANSI escape sequences that recolour or rewrite a terminal, line breaks
that forge a new CI annotation or a fake "healthy" line, bidi overrides that
reorder text ("Trojan Source"). Each renderer neutralises the same characters,
in the way its format needs: the terminal and GitHub drop them (line breaks
become spaces; GitHub escapes its own CR/LF), the HTML shows them as Unicode
control pictures so that they are seen, not interpreted.
"""

from __future__ import annotations

import re

#: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), other two-byte ESC sequences,
#: and the 8-bit C1 CSI/OSC introducers: removed whole, not character by character.
ANSI_RE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
)

#: Characters that end a line or a cell: tab, LF, VT, FF, CR, NEL and the Unicode
#: line and paragraph separators.
BREAKS = "\t\n\x0b\x0c\r\x85\u2028\u2029"

#: Every control a string must not carry raw: C0 and C1 controls, DEL, the
#: left-to-right/right-to-left marks and the bidi overrides and isolates. The
#: breaks above are among them.
CONTROLS = "\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"

CONTROL_RE = re.compile(f"[{CONTROLS}]")
BREAK_RE = re.compile(f"[{BREAKS}]")


def controls_except(keep: str) -> re.Pattern[str]:
    """:data:`CONTROLS` less the characters of ``keep`` (which a renderer treats itself)."""
    kept = set(keep)
    chars = [c for c in _expand(CONTROLS) if c not in kept]
    return re.compile("[" + "".join(re.escape(c) for c in chars) + "]")


def _expand(char_class: str) -> list[str]:
    """The characters of a ``[...]``-style class body made of single chars and ranges."""
    out: list[str] = []
    i = 0
    while i < len(char_class):
        if i + 2 < len(char_class) and char_class[i + 1] == "-":
            out.extend(chr(c) for c in range(ord(char_class[i]), ord(char_class[i + 2]) + 1))
            i += 3
        else:
            out.append(char_class[i])
            i += 1
    return out
