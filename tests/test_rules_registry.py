"""The rule registry: codes unique and documented, each emitted by a check, docs generated."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gradscope.report import CATEGORIES, SEVERITIES
from gradscope.rules.registry import FAMILIES, RULES, Rule, markdown_reference, register

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_is_documented(code: str) -> None:
    rule = RULES[code]
    assert re.fullmatch(r"GS[1-9][0-9]{2}", rule.code)
    assert FAMILIES[int(rule.code[2])] == rule.category and rule.category in CATEGORIES
    assert rule.severity in SEVERITIES
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rule.name)
    assert rule.summary and "\n" not in rule.summary and rule.summary.endswith(".")
    for text in (rule.what, rule.why, rule.fix):
        assert len(text) > 40, f"{code}: what/why/fix must explain, not name"
    assert rule.references, f"{code}: no paper or reference behind the rule"
    assert code in rule.explain() and rule.fix in rule.explain()


def test_codes_and_names_are_unique() -> None:
    assert len({r.name for r in RULES.values()}) == len(RULES)
    with pytest.raises(ValueError, match="duplicate"):
        register(RULES["GS101"])
    with pytest.raises(ValueError, match="family"):
        register(Rule("GS199", "x", "trace", "info", "s.", "w", "y", "f"))


@pytest.mark.parametrize("code", sorted(RULES))
def test_every_rule_is_emitted_by_a_check(code: str) -> None:
    """A code in the registry that no check can produce is dead documentation."""
    sources = "".join(p.read_text(encoding="utf-8")
                      for p in (REPO / "gradscope" / "rules").glob("*.py")
                      if p.name != "registry.py")
    assert f'"{code}"' in sources


def test_docs_rules_reference_is_generated() -> None:
    path = REPO / "docs" / "rules.md"
    if os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1":
        path.write_text(markdown_reference(), encoding="utf-8")
    assert path.read_text(encoding="utf-8") == markdown_reference(), \
        "docs/rules.md is stale: GRADSCOPE_UPDATE_GOLDEN=1 pytest tests/test_rules_registry.py"
