"""The ``gradscope`` console script: ``--help`` and ``--version`` without importing click.

A pre-commit hook or CI step that only asks for help or the version should cost
about one bare interpreter start. click's own import is 3.5x that (measured in
``benchmarks/startup.py``), so these two answers are served from a stored copy
of click's help text (``cli_help.txt``, kept equal to click's output by
``tests/test_cli.py``); everything else goes to the click CLI.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a third of the start-up this module exists to save
    from typing import Any

#: Stored output of ``gradscope --help`` (os.path, not pathlib: pathlib pulls in re,
#: urllib and ipaddress, more than the rest of the fast path together).
HELP_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_help.txt")


def main(argv: list[str] | None = None) -> Any:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]) and os.path.isfile(HELP_FILE):
        with open(HELP_FILE, encoding="utf-8") as f:
            sys.stdout.write(f.read())
        return 0
    if args in (["--version"], ["-V"]):
        from gradscope._version import __version__

        sys.stdout.write(f"gradscope, version {__version__}\n")
        return 0
    from gradscope.cli import run

    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
