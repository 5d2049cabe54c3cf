"""Progress on stderr (issue 15): quiet for quick stages, alive for long ones, in any stream."""

from __future__ import annotations

import io
import time

from gradscope.cli import Progress


def _progress(delay: float, every: float) -> tuple[Progress, io.StringIO]:
    progress = Progress(enabled=True, label="model.py", delay=delay, every=every)
    stream = io.StringIO()
    progress._stream = stream  # the CLI writes to sys.stderr, a terminal or a CI log
    return progress, stream


def test_a_long_stage_is_reported_again_and_again_until_it_ends() -> None:
    progress, stream = _progress(0.05, 0.05)
    progress("probe on cpu")
    time.sleep(0.4)
    progress.stop()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(line.startswith("gradscope: model.py: probe on cpu... (") for line in lines)
    time.sleep(0.15)
    assert stream.getvalue().splitlines() == lines  # nothing after the stage ended


def test_a_quick_stage_prints_nothing_and_a_new_stage_replaces_the_old() -> None:
    progress, stream = _progress(10.0, 10.0)
    progress("tracing")
    progress("static estimate")
    progress.stop()
    time.sleep(0.05)
    assert stream.getvalue() == ""
    progress, stream = _progress(0.05, 10.0)
    progress("tracing")
    time.sleep(0.2)
    progress("probe")
    time.sleep(0.2)
    progress.stop()
    assert [line.split(": ")[2].split("...")[0] for line in stream.getvalue().splitlines()] \
        == ["tracing", "probe"]


def test_disabled_progress_prints_nothing() -> None:
    progress = Progress(enabled=False, label="m", delay=0.01, every=0.01)
    stream = io.StringIO()
    progress._stream = stream
    progress("tracing")
    time.sleep(0.1)
    progress.stop()
    assert stream.getvalue() == ""
