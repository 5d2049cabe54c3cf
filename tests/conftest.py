"""Fixtures shared by every test module.

``sample_report(name)`` loads a sample model (``sample_models/NAME.py``, one of
``helpers.SAMPLES``) the way the CLI loads it and analyses it once per test session
with the default options on the CPU, ``gradscope.analyze(loaded.model,
loaded.inputs, device="cpu")``; every later request for the same name gets the same
objects back. A test that needs other options (``probe=False``, ``--meta``, a loss,
a changed model) calls ``analyze`` itself.

What it hands out is shared by all tests: read it, never change it. A test that has
to edit the report or its JSON document works on ``copy.deepcopy(...)`` of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from helpers import SAMPLE_DIR, SAMPLES


class SampleAnalysis(NamedTuple):
    """One sample model, loaded and analysed: unpacks as ``loaded, report, doc``."""

    loaded: Any  #: ``gradscope.loading.load_target``'s result: model, inputs, name, ...
    report: Any  #: the ``gradscope.Report``
    doc: dict[str, Any]  #: ``report.to_dict()``, the JSON report as Python objects


_CACHE: dict[str, SampleAnalysis] = {}


def analyse_sample(name: str) -> SampleAnalysis:
    """The session's analysis of ``sample_models/NAME.py``, computed on first use."""
    if name not in SAMPLES:
        raise KeyError(f"{name!r} is not a sample model (tests/helpers.py SAMPLES)")
    if name not in _CACHE:
        import gradscope
        from gradscope.loading import load_target

        loaded = load_target(str(SAMPLE_DIR / f"{name}.py"))
        report = gradscope.analyze(loaded.model, loaded.inputs, device="cpu")
        _CACHE[name] = SampleAnalysis(loaded, report, report.to_dict())
    return _CACHE[name]


@pytest.fixture(scope="session")
def sample_report() -> Callable[[str], SampleAnalysis]:
    """``sample_report(name)`` -> ``(loaded, report, doc)``, analysed once per session."""
    return analyse_sample
