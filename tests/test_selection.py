"""Rule selection the ruff way: ``select``, ``ignore`` and ``per-module-ignore``.

What must hold: the longest matching prefix decides (ignore on a tie), codes
are case-insensitive, ``ALL`` is every rule, per-module globs drop codes only
where they match, a code matching no registered rule is a one-line error
(exit 2) rather than a silent no-op, the command line wins over
``[tool.gradscope]``, and the report (status, exit code, JSON, SARIF) only
shows what the selection kept, with a note counting what it dropped.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from helpers import SAMPLE_DIR, cli_runner

import gradscope
from gradscope.cli import main
from gradscope.config import load_settings
from gradscope.errors import ConfigError
from gradscope.options import parse_per_module, per_module_pairs, split_codes
from gradscope.report import Finding, Location
from gradscope.rules import registry
from gradscope.rules.selection import RuleSelection

UNHEALTHY = SAMPLE_DIR / "deep_sigmoid_mlp.py"  # GS101 (static) and GS102 (probe), module "0"


def finding(code: str, module: str | None = None) -> Finding:
    return Finding(rule=code, category="trace", severity="error", message=f"{code} here",
                   location=Location(module=module, node=module))


def kept(selection: RuleSelection, *codes: str, module: str | None = None) -> list[str]:
    return [f.rule for f in selection.apply(finding(c, module) for c in codes)]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose pyproject.toml has no [tool.gradscope] unless a test adds it."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "user-project"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(folder: Path, body: str) -> None:
    (folder / "pyproject.toml").write_text(
        "[tool.gradscope]\n" + textwrap.dedent(body).lstrip("\n"), encoding="utf-8")


def analyze_cli(*args: Any) -> Result:
    return cli_runner().invoke(main, ["analyze", *[str(a) for a in args]],
                               catch_exceptions=False)


def one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradscope: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------ select / ignore semantics


def test_the_default_selection_keeps_everything() -> None:
    selection = RuleSelection()
    assert not selection.active
    codes = sorted(registry.RULES)
    assert kept(selection, *codes) == codes
    assert selection.suppressed_note([finding(c) for c in codes]) is None


@pytest.mark.parametrize("select,ignore,code,expected", [
    ((), ("GS1",), "GS101", False),
    ((), ("GS1",), "GS201", True),
    (("GS1",), (), "GS201", False),
    (("GS1",), (), "GS103", True),
    (("GS1",), ("GS101",), "GS101", False),   # the longer ignore wins
    (("GS1",), ("GS101",), "GS102", True),
    (("GS101",), ("GS1",), "GS101", True),    # the longer select wins
    (("GS101",), ("GS1",), "GS102", False),
    (("GS10",), ("GS1",), "GS103", True),     # GS10 is more specific than GS1
    (("GS1",), ("GS1",), "GS101", False),     # equal length: ignore wins
    (("GS101",), ("GS101",), "GS101", False),
    (("ALL",), ("GS8",), "GS801", False),
    (("ALL",), ("GS8",), "GS101", True),
    ((), ("ALL",), "GS101", False),
    (("ALL",), ("ALL",), "GS501", False),
    (("GS5",), ("ALL",), "GS501", True),      # any prefix is more specific than ALL
    (("GS",), ("GS80",), "GS802", False),
    (("GS",), ("GS80",), "GS501", True),
    (("gs10",), (), "GS103", True),           # case-insensitive
    ((), ("gs802",), "GS802", False),
    (("all",), ("Gs8",), "gs801", False),
])
def test_longest_prefix_wins_and_ignore_wins_ties(select: tuple[str, ...],
                                                  ignore: tuple[str, ...], code: str,
                                                  expected: bool) -> None:
    selection = RuleSelection(select=select, ignore=ignore)
    assert selection.selects(code) is expected
    assert selection.keeps(finding(code)) is expected


def test_codes_are_normalised_and_split() -> None:
    selection = RuleSelection(select=("gs1", "GS1", "GS8"), ignore=("gs101",))
    assert selection.select == ("GS1", "GS8")
    assert selection.ignore == ("GS101",)
    # a bare string is a comma-separated list, not a sequence of one-letter codes
    assert RuleSelection(select="GS1, GS8").select == ("GS1", "GS8")  # type: ignore[arg-type]
    assert split_codes(("GS101, GS102,", "gs8")) == ("GS101", "GS102", "gs8")
    assert split_codes("GS1") == ("GS1",)


def test_apply_keeps_order_and_the_note_counts_what_was_dropped() -> None:
    selection = RuleSelection(ignore=("GS8",))
    assert selection.active
    findings = [finding("GS802"), finding("GS101"), finding("GS801"), finding("GS501")]
    assert [f.rule for f in selection.apply(findings)] == ["GS101", "GS501"]
    note = selection.suppressed_note(findings)
    assert note is not None
    assert note.startswith("2 findings suppressed") and note.endswith("(GS801, GS802)")
    one = selection.suppressed_note([finding("GS801")])
    assert one is not None and one.startswith("1 finding suppressed")
    assert selection.suppressed_note([finding("GS101")]) is None
    assert not RuleSelection(select=("ALL",)).active


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("code", ["GS999", "GS9", "XYZ", "GS1O1", "101", "GS1010"])
@pytest.mark.parametrize("field", ["select", "ignore", "per_module_ignore"])
def test_a_code_matching_no_rule_is_a_config_error(code: str, field: str) -> None:
    kwargs: dict[str, Any] = {field: (("encoder.*", (code,)),) if field == "per_module_ignore"
                              else ("GS1", code)}
    with pytest.raises(ConfigError) as info:
        RuleSelection(**kwargs)
    line = info.value.one_line()
    assert "\n" not in line
    assert repr(code) in line
    assert "gradscope rules" in line, "the hint says where the codes are listed"


def test_empty_glob_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="glob"):
        RuleSelection(per_module_ignore=(("  ", ("GS1",)),))
    with pytest.raises(ConfigError, match="per-module-ignore"):
        RuleSelection(per_module_ignore=(("x", 3),))  # type: ignore[arg-type]


def test_validation_reads_the_registry_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules registered after import (new families) are valid codes at once."""
    with pytest.raises(ConfigError):
        RuleSelection(ignore=("GS9",))
    new_rule = dataclasses.replace(registry.RULES["GS101"], code="GS901")
    monkeypatch.setitem(registry.RULES, "GS901", new_rule)
    selection = RuleSelection(ignore=("GS9",))
    assert kept(selection, "GS901", "GS101") == ["GS101"]


# ------------------------------------------------------------------ per-module-ignore


@pytest.mark.parametrize("glob,module,matches", [
    ("encoder.layers.*", "encoder.layers.0.attn", True),
    ("encoder.layers.*", "encoder.layers.3", True),
    ("encoder.layers.*", "encoder.embed", False),
    ("encoder.layers.*", "decoder.layers.0", False),
    ("encoder.layers.*", "encoder.layers", False),
    ("*.attn", "encoder.layers.0.attn", True),
    ("*.attn", "encoder.layers.0.attn.proj", False),
    ("encoder", "encoder", True),
    ("encoder", "encoder.fc", False),
    ("Encoder.*", "encoder.fc", False),             # module paths are case-sensitive
    ("layers.?", "layers.7", True),
    ("layers.[0-2]", "layers.3", False),
    ("*", "anything.at.all", True),
    ("*", None, True),                              # the whole model: only '*'
    ("**", None, False),
    ("encoder.*", None, False),
])
def test_per_module_globs(glob: str, module: str | None, matches: bool) -> None:
    selection = RuleSelection(per_module_ignore=((glob, ("GS1",)),))
    assert selection.keeps(finding("GS101", module)) is not matches
    assert selection.keeps(finding("GS801", module)), "other codes stay everywhere"


def test_per_module_codes_are_prefixes_and_beat_select() -> None:
    selection = RuleSelection(select=("GS101", "GS8"), per_module_ignore=per_module_pairs(
        {"encoder.*": ["gs1"], "*.head": "GS801,GS802"}))
    assert selection.per_module_ignore == (("encoder.*", ("GS1",)), ("*.head", ("GS801", "GS802")))
    assert kept(selection, "GS101", "GS801", module="encoder.0") == ["GS801"]
    assert kept(selection, "GS101", "GS801", module="decoder.0") == ["GS101", "GS801"]
    assert kept(selection, "GS101", "GS801", "GS102", module="decoder.head") == ["GS101"]


def test_per_module_pairs_accepts_repeated_globs() -> None:
    pairs = per_module_pairs([("a.*", ["GS1"]), ("a.*", ("GS8",))])
    selection = RuleSelection(per_module_ignore=pairs)
    assert kept(selection, "GS101", "GS801", "GS501", module="a.b") == ["GS501"]
    assert per_module_pairs(None) == ()
    with pytest.raises(ConfigError):
        per_module_pairs([("a.*", ["GS1"], "extra")])  # type: ignore[list-item]


@pytest.mark.parametrize("value,expected", [
    ("encoder.*=GS101,GS102", ("encoder.*", ("GS101", "GS102"))),
    (" *.attn = gs1 ", ("*.attn", ("gs1",))),
    ("a=b=GS1", ("a=b", ("GS1",))),
    ("*=GS8,", ("*", ("GS8",))),
])
def test_parse_per_module(value: str, expected: tuple[str, tuple[str, ...]]) -> None:
    assert parse_per_module(value) == expected


@pytest.mark.parametrize("value", ["encoder.*", "=GS1", "encoder.*=", "encoder.*=,", ""])
def test_parse_per_module_rejects_malformed_values(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_per_module(value)
    assert "GLOB=CODE" in info.value.one_line()


# ------------------------------------------------------------------ pyproject.toml


def test_selection_from_pyproject(project: Path) -> None:
    write_config(project, """
        select = ["GS1", "gs8"]
        ignore = ["GS103"]

        [tool.gradscope.per-module-ignore]
        "encoder.layers.*" = ["GS101", "GS102"]
        "*" = ["GS801"]
    """)
    settings = load_settings()
    assert settings.select == ("GS1", "gs8")
    assert settings.ignore == ("GS103",)
    assert settings.per_module_ignore == (("encoder.layers.*", ("GS101", "GS102")),
                                          ("*", ("GS801",)))


def test_the_readme_example_is_valid(project: Path) -> None:
    """The README's select/ignore example loads as written, so the docs cannot drift."""
    readme = (SAMPLE_DIR.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    example = next(b for b in blocks if "per-module-ignore" in b)
    (project / "pyproject.toml").write_text(example, encoding="utf-8")
    settings = load_settings()
    assert settings.select == ("ALL",) and settings.ignore
    assert settings.per_module_ignore


def test_underscore_spelling_of_per_module_ignore(project: Path) -> None:
    write_config(project, """
        [tool.gradscope.per_module_ignore]
        "*.attn" = ["GS5"]
    """)
    assert load_settings().per_module_ignore == (("*.attn", ("GS5",)),)


@pytest.mark.parametrize("body,fragments", [
    ('select = "GS1"', ["select", "list of rule codes"]),
    ("ignore = [101]", ["ignore", "list of rule codes"]),
    ('ignore = ["GS999"]', ["'GS999'", "ignore", "gradscope rules"]),
    ('select = ["GS1", "nope"]', ["'nope'", "select"]),
    ('per-module-ignore = ["GS1"]', ["per-module-ignore", "table"]),
    ('[tool.gradscope.per-module-ignore]\n"enc.*" = "GS1"', ["enc.*", "list of rule codes"]),
    ('[tool.gradscope.per-module-ignore]\n"enc.*" = ["GS0"]', ["'GS0'", "enc.*"]),
])
def test_bad_selection_in_pyproject_names_the_setting(project: Path, body: str,
                                                      fragments: list[str]) -> None:
    write_config(project, body)
    with pytest.raises(ConfigError) as info:
        load_settings()
    line = info.value.one_line()
    for fragment in [*fragments, "pyproject.toml"]:
        assert fragment in line, (fragment, line)


def static_rules(*args: str) -> set[str]:
    """The rule codes of the sample's static findings, through the command line."""
    result = analyze_cli(UNHEALTHY, "--no-probe", "--fail-on", "never", "--json", "-", *args)
    assert result.exit_code == 0, result.stderr
    return {f["rule"] for f in json.loads(result.stdout)["findings"]}


@pytest.mark.slow
def test_command_line_selection_wins_over_the_file(project: Path) -> None:
    assert "GS101" in static_rules()
    write_config(project, 'ignore = ["GS1"]\n')
    assert "GS101" not in static_rules(), "the file's ignore applies"
    assert "GS101" in static_rules("--ignore", "GS8"), "--ignore replaces the file's list"
    write_config(project, 'select = ["GS8"]\n')
    assert "GS101" not in static_rules()
    assert "GS101" in static_rules("--select", "ALL")
    write_config(project, '[tool.gradscope.per-module-ignore]\n"0" = ["GS101"]\n')
    assert "GS101" not in static_rules()
    assert "GS101" in static_rules("--per-module-ignore", "encoder.*=GS1")


def test_bad_code_in_the_file_is_exit_2(project: Path) -> None:
    write_config(project, 'ignore = ["GS1", "GS9"]\n')
    one_line_error(analyze_cli(UNHEALTHY, "--no-probe"), "'GS9'", "pyproject.toml")


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("args,fragments", [
    (["--ignore", "GS999"], ["'GS999'", "--ignore"]),
    (["--select", "GS1,nope"], ["'nope'", "--select"]),
    (["--per-module-ignore", "enc.*=GS1,GS042"], ["'GS042'", "--per-module-ignore", "enc.*"]),
    (["--per-module-ignore", "enc.*"], ["GLOB=CODE"]),
])
def test_bad_selection_option_is_exit_2_before_loading(project: Path, args: list[str],
                                                       fragments: list[str]) -> None:
    # the target does not exist: the option is rejected first, so the error names the code
    line = one_line_error(analyze_cli("missing_model.py", *args), *fragments)
    assert "missing_model.py" not in line


@pytest.mark.slow
def test_ignore_changes_the_exit_code(project: Path) -> None:
    baseline = analyze_cli(UNHEALTHY, "--fail-on", "error", "--json", "-")
    assert baseline.exit_code == 1
    before = json.loads(baseline.stdout)
    errors = {f["rule"] for f in before["findings"] if f["severity"] == "error"}
    assert errors == {"GS101", "GS102"}, "the sample's errors are its vanishing gradient"

    result = analyze_cli(UNHEALTHY, "--ignore", "GS101,GS102", "--fail-on", "error", "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] != "unhealthy"
    assert doc["findings"] == [f for f in before["findings"] if f["rule"] not in errors]
    assert "2 rules not run by select/ignore (GS101, GS102)" in doc["notes"], doc["notes"]
    assert analyze_cli(UNHEALTHY, "--ignore", "GS101", "--ignore", "gs102", "-q").exit_code == 0, \
        "repeated options add up"
    result = analyze_cli(UNHEALTHY, "--ignore", "GS101", "--json", "-")
    assert result.exit_code == 1, "the probe's GS102 is still an error"
    rules = {f["rule"] for f in json.loads(result.stdout)["findings"]}
    assert "GS102" in rules and "GS101" not in rules


def test_select_and_per_module_ignore_reach_sarif(project: Path) -> None:
    result = analyze_cli(UNHEALTHY, "--select", "GS101,GS102", "--ignore", "GS102", "--sarif", "-")
    assert result.exit_code == 1
    assert [r["ruleId"] for r in json.loads(result.stdout)["runs"][0]["results"]] == ["GS101"]
    result = analyze_cli(UNHEALTHY, "--select", "GS101,GS102", "--per-module-ignore", "0=GS1",
                         "--sarif", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["runs"][0]["results"] == []


def test_help_lists_the_selection_options(project: Path) -> None:
    result = cli_runner().invoke(main, ["analyze", "--help"])
    for option in ("--select", "--ignore", "--per-module-ignore"):
        assert option in result.stdout, option


# ------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def sigmoid() -> Any:
    from gradscope.loading import load_target

    return load_target(str(UNHEALTHY))


def test_analyze_ignore_removes_the_vanishing_findings(sigmoid: Any) -> None:
    from gradscope.schema import validate_report

    baseline = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu")
    assert baseline.status == "unhealthy"
    assert {"GS101", "GS102"} <= {f.rule for f in baseline.findings}
    assert all(f.severity != "error" for f in baseline.findings if not f.rule.startswith("GS1")), \
        "the sample's errors are its vanishing gradient"
    assert not any("suppressed" in note for note in baseline.notes)

    report = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu", ignore=["GS1"])
    dropped = [f for f in baseline.findings if f.rule.startswith("GS1")]
    assert report.findings == [f for f in baseline.findings if not f.rule.startswith("GS1")]
    assert report.status != "unhealthy"
    assert report.status == ("warning" if report.count("warning") else "healthy")
    assert not report.fails("error")
    assert dropped, "the sample has vanishing findings to drop"
    # selection decides before a rule runs: the note names the rules, not their findings
    assert [n for n in report.notes if "not run" in n] == [
        "4 rules not run by select/ignore (GS101, GS102, GS103, GS104)"]
    doc = report.to_dict()
    validate_report(doc)
    assert doc["status"] == report.status
    assert {f["rule"] for f in doc["findings"]} == {f.rule for f in report.findings}
    assert report.layers == baseline.layers, "only findings change, not the measurements"

    everything = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu", ignore=["ALL"])
    assert everything.findings == [] and everything.status == "healthy"
    assert any(n.startswith("24 rules not run by select/ignore (GS101, ") for n in everything.notes)


def test_analyze_select_and_per_module_ignore(sigmoid: Any) -> None:
    report = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu", select=["gs102"])
    assert [f.rule for f in report.findings] == ["GS102"]
    assert report.status == "unhealthy"
    # the longer select entry beats the shorter ignore entry
    report = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu",
                               select=["GS101", "GS102"], ignore=["GS1"])
    assert [f.rule for f in report.findings] == ["GS101", "GS102"]
    report = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu",
                               select="GS101,GS102", per_module_ignore={"0": ["GS101"]})
    assert [f.rule for f in report.findings] == ["GS102"]
    assert any("suppressed" in n and "GS101" in n for n in report.notes), report.notes
    report = gradscope.analyze(sigmoid.model, sigmoid.inputs, device="cpu", probe=False,
                               select=["GS101"], per_module_ignore={"1*": ["GS1"]})
    assert [f.rule for f in report.findings] == ["GS101"], "the glob matches no finding"


def test_analyze_rejects_an_unknown_code_before_running() -> None:
    def factory() -> Any:
        raise AssertionError("the model must not be built for a bad selection")

    with pytest.raises(ConfigError, match="GS999"):
        gradscope.analyze(factory, (), ignore=["GS999"])
    with pytest.raises(ConfigError, match="GS042"):
        gradscope.analyze(factory, (), per_module_ignore={"*": ["GS042"]})
