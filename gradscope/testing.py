"""A pytest-friendly assertion: keep a model's gradient flow healthy in a test suite.

``gradscope analyze`` in CI checks model files; many projects build their
models in code and test them with pytest instead. ``assert_healthy_gradients``
lets such a test fail the way tests fail (``AssertionError``) with a message
that is the diagnosis itself: each failing finding, where it is, and the fix
with its code, so the failure is actionable from the test log alone.

Importing this module does not import torch (collection stays fast and
``gradscope.testing`` works in tooling without it); the analysis imports it
when the assertion runs.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradscope.options import FAIL_ON

if TYPE_CHECKING:
    from gradscope.report import Finding, Report

__all__ = ["FAIL_ON", "assert_healthy_gradients", "failure_message"]

#: ``FAIL_ON``, the accepted values of ``fail_on`` (a severity, or ``never``: report, do
#: not fail), is ``gradscope.options.FAIL_ON``, the command line's ``--fail-on`` choices.

#: Recommendations quoted per finding: the first is the one the rule ranks best,
#: the second its usual alternative; more would bury the next finding.
RECOMMENDATIONS_SHOWN = 2


def _check_fail_on(fail_on: str) -> str:
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {', '.join(map(repr, FAIL_ON))}, "
                         f"not {fail_on!r}")
    return fail_on


def _where(finding: Finding) -> str:
    """``file:line (module)``; a bare module path says so (``module 0``, not ``0``)."""
    loc = finding.location
    if loc.file:
        return loc.short()
    if loc.module:
        return f"module {loc.module}"
    return f"node {loc.node}" if loc.node else "the whole model"


def failure_message(report: Report, failing: Sequence[Finding], fail_on: str) -> str:
    """The assertion message: a headline, then each failing finding with its fixes.

    Every finding gets its code, severity, ``file:line (module)`` location and
    message; then its first recommendations, each code snippet indented under
    its text so it can be copied straight out of the pytest output.
    """
    name = report.model.name
    lines = [f"gradscope: {len(failing)} finding(s) at or above {fail_on!r} in {name} "
             f"(status {report.status}):"]
    shown_code: set[str] = set()
    for finding in failing:
        lines.append(f"  {finding.rule} {finding.severity} at {_where(finding)}: "
                     f"{finding.message}")
        for rec in finding.recommendations[:RECOMMENDATIONS_SHOWN]:
            lines.append(f"    fix: {rec.text}")
            if rec.code and rec.code in shown_code:
                # Related findings (predicted and measured) share a fix: its code once is enough.
                lines.append("        (code as above)")
            elif rec.code:
                shown_code.add(rec.code)
                lines.append(textwrap.indent(rec.code.rstrip("\n"), " " * 8))
    others = len(report.findings) - len(failing)
    if others:
        lines.append(f"  ({others} milder finding(s) below {fail_on!r} not listed)")
    lines.append("  explain a code with: gradscope rules CODE")
    return "\n".join(lines)


def assert_healthy_gradients(model: Any, example_inputs: Any, fail_on: str = "error",
                             **analyze_options: Any) -> Report:
    """Analyse ``model`` on ``example_inputs``; raise ``AssertionError`` listing what fails.

    ``fail_on`` is the least serious severity that fails the assertion
    (``"error"``, ``"warning"``, ``"info"``, or ``"never"`` to only return the
    report). ``analyze_options`` go to :func:`gradscope.analyze` unchanged
    (``options=AnalysisOptions(...)`` or its fields: ``device``, ``probe``, ``lr``,
    ``ignore``, ``thresholds`` ...); the default
    device is the CPU, so a test gives the same verdict on every machine.
    Returns the report when no finding is at or above ``fail_on``, for further
    checks of your own. A bad ``fail_on`` is a ``ValueError`` raised before
    anything runs.
    """
    # pytest shows the source of every frame of a failing test; this one's is gradscope's,
    # not the user's: hidden, the failure shows the test's line and then the diagnosis.
    __tracebackhide__ = True
    _check_fail_on(fail_on)
    from gradscope.api import analyze

    report = analyze(model, example_inputs, **analyze_options)
    from gradscope.records import reaches, severity_rank

    failing = [f for f in report.findings if reaches(f.severity, fail_on)]
    if failing:
        # Most serious first, the order the terminal report uses.
        failing.sort(key=lambda f: severity_rank(f.severity))
        raise AssertionError(failure_message(report, failing, fail_on))
    return report
