"""Writing report files without leaving half of one behind.

A CI job that is killed, or a disk that fills up, while a report is being
written must not leave a truncated JSON that a later step parses as a valid
(but wrong) report. Every file is therefore written to a temporary sibling,
flushed to disk, and renamed over the target in one step: readers see either
the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from gradscope.errors import OutputError

_HINT = "choose a writable path with --html/--json/--sarif"


def _reason(exc: OSError) -> str:
    """The OS's own words, without the path it repeats (we name the path ourselves)."""
    return exc.strerror or str(exc) or type(exc).__name__


def ensure_parent_writable(path: str | Path) -> None:
    """Fail before a long analysis rather than after it, when the report cannot be written.

    ``-`` (stdout) is always fine. This is a best-effort early check: the atomic
    write still reports its own error if something changes in between.
    """
    if str(path) == "-":
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"cannot write {target}: directory {parent} does not exist", _HINT)
    if not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is not a directory", _HINT)
    if target.is_dir():
        raise OutputError(f"cannot write {target}: it is a directory", _HINT)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: directory {parent} is not writable", _HINT)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file).

    Best effort: some systems (Windows) cannot open a directory, and the report
    is already complete and in place, so a failure here is not an error.
    """
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) all at once, or not at all.

    The temporary file lives in the target's directory because ``os.replace``
    is only atomic within one filesystem. It is opened with mode 0o666 so the
    kernel applies the umask as for a plain ``open`` (``mkstemp`` would make it
    owner-only, and a report is meant to be shared), and with ``O_EXCL`` so a
    leftover or hostile file of the same name is never written through.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    tmp_path: Path | None = None
    try:
        fd = -1
        for _ in range(100):
            candidate = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            tmp_path = candidate
            break
        if tmp_path is None:
            raise FileExistsError(errno.EEXIST, "no free temporary file name")
        try:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
        except BaseException:
            os.close(fd)  # fdopen did not take the descriptor over
            raise
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        tmp_path = None
        _sync_directory(directory)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {_reason(exc)}", _HINT) from exc
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
