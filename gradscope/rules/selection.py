"""Which findings a run keeps: ruff-style ``select``, ``ignore`` and ``per-module-ignore``.

A team adopting gradscope on an existing model needs to silence a known,
accepted finding (a fallback tracer, GS801) or a whole family in one part of
the model (the frozen encoder's vanishing gradient) without turning the rest
off, and CI must then fail only on what is left. The semantics are ruff's, so
they need no new explanation:

* a code is a full code (``GS101``) or a prefix of codes (``GS1``, ``GS10``,
  ``GS``), matched case-insensitively; ``ALL`` is every code;
* an empty ``select`` selects every rule;
* a finding is kept when the longest ``select`` entry matching its code is
  longer than the longest ``ignore`` entry matching it (``ALL`` counts as the
  shortest prefix); on equal length ``ignore`` wins, so ``select = ["GS1"]``
  with ``ignore = ["GS10"]`` keeps GS1xx but GS10x, and ``select = ["GS101"]``
  with ``ignore = ["GS1"]`` keeps GS101 alone;
* ``per-module-ignore`` maps fnmatch globs on the finding's module path
  (``encoder.layers.*``, ``*.attn``) to codes dropped there whatever ``select``
  says; a finding about the whole model (no module) is matched only by ``*``.

A code or prefix that matches no registered rule is an error, never silently
nothing: a typo in CI configuration must not leave a check on that was meant
off (or the reverse). The registry is read when a selection is built, not
copied at import, so rules registered later are known. No torch here: the CLI
validates settings before deciding whether torch is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gradscope.errors import ConfigError
from gradscope.options import PerModule, per_module_pairs, split_codes
from gradscope.records import Finding
from gradscope.rules import registry

#: Selects (or ignores) every rule; it is the least specific entry.
ALL = "ALL"

_HINT = "run 'gradscope rules' for the codes; a prefix such as GS1 covers GS1xx"



def check_codes(codes: Iterable[str], where: str) -> tuple[str, ...]:
    """The codes upper-cased; a :class:`ConfigError` naming ``where`` for one matching no rule.

    ``where`` says where the code came from (``--ignore``, ``ignore in [tool.gradscope]
    of ...``), so the one-line error points at the line to fix.
    """
    known = list(registry.RULES)  # read now: rules registered after import count
    checked: list[str] = []
    for code in codes:
        if not isinstance(code, str):
            raise ConfigError(f"{where} must list rule codes as strings, not {code!r}",
                              'write them like ["GS101", "GS8"]')
        text = code.strip().upper()
        if not text:
            raise ConfigError(f"empty rule code in {where}", _HINT)
        if text != ALL and not any(known_code.startswith(text) for known_code in known):
            raise ConfigError(f"unknown rule code {code!r} in {where}: no rule code starts "
                              f"with it", _HINT)
        if text not in checked:
            checked.append(text)
    return tuple(checked)


def _longest(code: str, prefixes: Iterable[str]) -> int:
    """Length of the longest entry matching ``code``; ALL counts 0; -1 when none matches."""
    best = -1
    for prefix in prefixes:
        if prefix == ALL:
            best = max(best, 0)
        elif code.startswith(prefix):
            best = max(best, len(prefix))
    return best


def _module_matches(glob: str, module: str | None) -> bool:
    """fnmatch, case-sensitive like Python attribute names; no module only matches ``*``."""
    if not module:
        return glob == "*"
    return fnmatchcase(module, glob)


@dataclass(frozen=True)
class RuleSelection:
    """``select``/``ignore``/``per_module_ignore`` as given, validated and upper-cased.

    Building one checks every code against the rule registry (a
    :class:`ConfigError` for a code matching none), so a selection that exists
    is one whose every entry means something.
    """

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    per_module_ignore: PerModule = ()

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, once, at construction.
        # A bare string is one comma-separated list, not a sequence of one-letter codes.
        object.__setattr__(self, "select", check_codes(split_codes(self.select), "select"))
        object.__setattr__(self, "ignore", check_codes(split_codes(self.ignore), "ignore"))
        pairs = []
        for glob, codes in per_module_pairs(self.per_module_ignore):
            if not glob.strip():
                raise ConfigError("empty module glob in per-module-ignore",
                                  "use '*' for every module, 'encoder.*' for a subtree")
            pairs.append((glob.strip(),
                          check_codes(codes, f"per-module-ignore {glob.strip()!r}")))
        object.__setattr__(self, "per_module_ignore", tuple(pairs))

    @property
    def active(self) -> bool:
        """Whether the selection can drop anything (the default keeps every finding)."""
        return bool(self.ignore or self.per_module_ignore
                    or (self.select and ALL not in self.select))

    def selects(self, code: str) -> bool:
        """Whether ``code`` survives ``select``/``ignore`` (longest prefix wins, ties ignore)."""
        code = code.upper()
        chosen = _longest(code, self.select or (ALL,))
        return chosen >= 0 and chosen > _longest(code, self.ignore)

    def keeps(self, finding: Finding) -> bool:
        """Whether the finding stays in the report."""
        code = finding.rule.upper()
        if not self.selects(code):
            return False
        module = finding.location.module
        return not any(_module_matches(glob, module) and _longest(code, codes) >= 0
                       for glob, codes in self.per_module_ignore)

    def apply(self, findings: Iterable[Finding]) -> list[Finding]:
        """The findings kept, in their order."""
        return [f for f in findings if self.keeps(f)]

    def not_run_note(self, codes: Sequence[str]) -> str | None:
        """The report note naming the rules that select/ignore kept from running.

        Selection decides before a rule runs (its costly what-if estimates
        included), so what it would have found is not known; the note says which
        rules a reader of a healthy report cannot rely on.
        """
        if not self.active or not codes:
            return None
        noun = "rule" if len(codes) == 1 else "rules"
        return f"{len(codes)} {noun} not run by select/ignore ({', '.join(sorted(codes))})"

    def suppressed_note(self, findings: Sequence[Finding]) -> str | None:
        """The report note saying what the selection dropped from ``findings`` after they ran
        (per-module ignores, and other codes of a check that ran for a selected one).

        A suppressed finding must stay visible somewhere: a reader of a healthy
        report should be able to tell it was made healthy by configuration.
        """
        dropped = [f for f in findings if not self.keeps(f)]
        if not dropped:
            return None
        codes = ", ".join(sorted({f.rule for f in dropped}))
        noun = "finding" if len(dropped) == 1 else "findings"
        return (f"{len(dropped)} {noun} suppressed by select/ignore/per-module-ignore "
                f"({codes})")
