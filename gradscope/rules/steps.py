"""Running the rules over training steps (``gradscope.watch``) on a :class:`TrainingRecord`.

The rules themselves live in their families (GS105 in ``vanishing``, GS203 in
``exploding``, GS403 in ``dead_units``, GS503 in ``nonfinite``, GS603-GS606 in
``learning_rate``), each family's ``step_checks``; this module only runs the selected
ones, as :func:`gradscope.rules.analysis.run_rules` does for the before-training checks.
"""

from __future__ import annotations

from gradscope.records import Finding, severity_rank
from gradscope.rules.registry import STEP_CHECKS
from gradscope.rules.selection import RuleSelection
from gradscope.steps import TrainingRecord


def run_step_rules(record: TrainingRecord,
                   selection: RuleSelection | None = None) -> list[Finding]:
    """The selected rules over steps on ``record``, most serious first."""
    selects = selection.selects if selection is not None else (lambda _code: True)
    findings: list[Finding] = []
    for check in STEP_CHECKS:
        chosen = [code for code in check.codes if selects(code)]
        if chosen:
            findings.extend(f for f in check.run(record) if f.rule in chosen)
    findings.sort(key=lambda f: (severity_rank(f.severity), f.rule, f.location.module or ""))
    return findings
