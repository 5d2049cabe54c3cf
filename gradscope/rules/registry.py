"""The registry: every rule family's codes, collected from the family modules.

Codes are grouped by hundreds per family and never reused:
GS1xx vanishing gradients, GS2xx exploding gradients, GS3xx saturation,
GS4xx dead units, GS5xx non-finite values, GS6xx learning rate,
GS7xx architecture, GS8xx tracing. Each family module (``gradscope.rules.vanishing``
... ``gradscope.rules.trace``) defines its codes, checks, messages and fixes; this
module only collects them. Neither imports torch, so ``gradscope rules``, the
settings and the renderers stay light.
"""

from __future__ import annotations

from collections.abc import Iterator

from gradscope.rules import (
    architecture,
    dead_units,
    exploding,
    learning_rate,
    nonfinite,
    saturation,
    trace,
    vanishing,
)
from gradscope.rules.base import CATEGORIES_BY_FAMILY, Check, Rule

#: Code families by hundreds and their category (the third character of a code).
FAMILIES = CATEGORIES_BY_FAMILY


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add a rule; a duplicate code or a code outside its family is a programming error."""
    if rule.code in RULES:
        raise ValueError(f"duplicate rule code {rule.code}")
    family = int(rule.code[2])
    if FAMILIES.get(family) != rule.category:
        raise ValueError(f"{rule.code} is in family {family} but has category {rule.category}")
    RULES[rule.code] = rule
    return rule


def iter_rules() -> Iterator[Rule]:
    """Rules in code order, for listings and SARIF."""
    for code in sorted(RULES):
        yield RULES[code]


#: Markers around the generated rule table in README.md.
TABLE_START = "<!-- rules:start (generated: gradscope rules --format markdown) -->"
TABLE_END = "<!-- rules:end -->"


def markdown_table() -> str:
    """The README's rule table, generated so it cannot drift from the registry."""
    lines = ["| code | name | severity | category | summary |", "|---|---|---|---|---|"]
    lines += [f"| {r.code} | {r.name} | {r.severity} | {r.category} | {r.summary} |"
              for r in iter_rules()]
    return "\n".join(lines) + "\n"


def markdown_reference() -> str:
    """docs/rules.md: every rule's what / why / fix and papers, generated like the table."""
    out = ["# Rules", "",
           "Generated from the rule family modules in `gradscope/rules/` (`gradscope rules "
           "--format reference`); `gradscope rules CODE` prints the same text.", ""]
    for family, category in sorted(FAMILIES.items()):
        rules = [r for r in iter_rules() if r.category == category]
        if not rules:
            continue
        out += [f"## GS{family}xx: {category}", ""]
        for r in rules:
            out += [f"### {r.code} {r.name}", "",
                    f"Default severity **{r.severity}**. {r.summary}", "",
                    f"**What.** {r.what}", "", f"**Why.** {r.why}", "",
                    f"**How to fix.** {r.fix}", ""]
            if r.references:
                out += ["References:", "", *[f"- {ref}" for ref in r.references], ""]
    return "\n".join(out)


def replace_table(readme: str) -> str:
    """``readme`` with the text between the table markers regenerated."""
    head, found, rest = readme.partition(TABLE_START)
    _, found_end, tail = rest.partition(TABLE_END)
    if not found or not found_end:
        raise ValueError("README.md has no rule-table markers")
    return f"{head}{TABLE_START}\n{markdown_table()}{TABLE_END}{tail}"


def get_rule(code: str) -> Rule:
    try:
        return RULES[code.upper()]
    except KeyError:
        raise KeyError(code) from None


#: The family modules, in code order: each defines its rules and checks in one place.
FAMILY_MODULES = (vanishing, exploding, saturation, dead_units, nonfinite, learning_rate,
                  architecture, trace)

for _module in FAMILY_MODULES:
    for _rule in _module.FAMILY.rules:
        if int(_rule.code[2]) != _module.FAMILY.number:
            raise ValueError(f"{_rule.code} is declared in {_module.__name__}")
        register(_rule)

#: Every check, family by family; ``gradscope.rules.analysis.run_rules`` runs the selected ones.
CHECKS: tuple[Check, ...] = tuple(check for m in FAMILY_MODULES for check in m.FAMILY.checks)
#: Every check over training steps (``gradscope.rules.steps.run_step_rules``).
STEP_CHECKS: tuple[Check, ...] = tuple(check for m in FAMILY_MODULES
                                       for check in m.FAMILY.step_checks)
