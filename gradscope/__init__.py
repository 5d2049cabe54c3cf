"""gradscope: diagnose gradient flow in PyTorch models before training.

The pipeline, one module per stage: ``loading`` (target -> model, inputs) ->
``tracing`` (model -> networkx graph) -> ``estimate`` (static gradient
estimate) -> ``probe`` (one real forward/backward) -> ``rules`` (findings and
fixes) -> ``report`` (plain data) -> ``render`` (JSON, HTML, SARIF, terminal).
``watching`` (``gradscope.watch``) records the first steps of the user's own
training run and judges them with the rules over steps (``gradscope.steps``
holds what it recorded).

Importing this package does not import torch: ``analyze`` loads it on first
use, so ``gradscope --help`` and CI tooling that only reads reports stay fast.
"""

from __future__ import annotations

from gradscope._version import __version__

#: Not typing.TYPE_CHECKING: importing typing (with re and collections) would double
#: the start-up of ``gradscope --help`` (gradscope._entry), which imports this package.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from gradscope import fixes as fixes
    from gradscope.api import analyze as analyze
    from gradscope.errors import GradscopeError as GradscopeError
    from gradscope.report import Finding as Finding
    from gradscope.report import Report as Report
    from gradscope.testing import assert_healthy_gradients as assert_healthy_gradients
    from gradscope.watching import Watch as Watch
    from gradscope.watching import watch as watch

__all__ = ["Finding", "GradscopeError", "Report", "Watch", "__version__", "analyze",
           "assert_healthy_gradients", "fixes", "watch"]


def __getattr__(name: str) -> Any:
    # Lazy attributes keep torch out of ``import gradscope``.
    if name == "GradscopeError":  # enum, for ExitCode, is not free either
        from gradscope.errors import GradscopeError

        return GradscopeError
    if name == "analyze":
        from gradscope.api import analyze

        return analyze
    if name == "assert_healthy_gradients":  # torch waits until the assertion runs
        from gradscope.testing import assert_healthy_gradients

        return assert_healthy_gradients
    if name == "fixes":  # gradscope.fixes.apply: a report's actions, applied to a model
        import importlib

        return importlib.import_module("gradscope.fixes")
    if name in ("watch", "Watch"):  # the first steps of a real training run
        from gradscope import watching

        return getattr(watching, name)
    if name in ("Report", "Finding"):
        from gradscope import report

        return getattr(report, name)
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
