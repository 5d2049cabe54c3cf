"""One declaration of the analysis options (``gradscope.options``), three ways to give them.

Every field of :class:`AnalysisOptions` must be a ``gradscope analyze`` option (or be
listed in :data:`NO_CLI_OPTION` with the reason), a ``[tool.gradscope]`` key and a
keyword of :func:`gradscope.analyze`, with the same default everywhere (or be listed in
:data:`SETTINGS_DEFAULT_DIFFERS`); every ``analyze`` option must be a field or one of
the command line's own settings (:data:`CLI_ONLY`). A field added without its command
line option, or an option added to the command line alone, fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import textwrap
from dataclasses import Field
from pathlib import Path
from typing import Any

import click
import pytest
from helpers import cli_runner

from gradscope import api, cli, config, testing
from gradscope.config import Settings, load_settings
from gradscope.errors import ConfigError
from gradscope.options import (
    FAIL_ON,
    OPTION_FIELDS,
    OPTION_NAMES,
    THRESHOLDS,
    AnalysisOptions,
    Thresholds,
    default_of,
    settings_default_of,
    settings_defaults,
)

REPO = Path(__file__).resolve().parents[1]
UNHEALTHY = REPO / "sample_models" / "deep_sigmoid_mlp.py"

#: Fields with no command-line option, and why.
NO_CLI_OPTION = {
    # Twelve numbers: set in [tool.gradscope.thresholds] (or passed as Thresholds(...)).
    "thresholds",
}

#: Fields whose command-line and [tool.gradscope] default is not the library's, and why.
SETTINGS_DEFAULT_DIFFERS = {
    # The CLI uses a GPU when there is one; in a test suite (gradscope.analyze,
    # assert_healthy_gradients) the CPU gives the same verdict on every machine.
    "device": "auto",
}

#: ``gradscope analyze`` parameters that are the command line's own, not the analysis's.
CLI_ONLY = {
    "targets",          # what to analyse (or [tool.gradscope] targets)
    "input_shape",      # building the inputs (loading), also a [tool.gradscope] key
    "dtype",            # ditto
    "html",             # reports written from the result, also [tool.gradscope] keys
    "json_path",        # --json; the key is json
    "sarif",
    "fmt",              # --format: what goes to stdout
    "fail_on",          # the exit code, decided from the findings; also a key
    "baseline",         # ditto, against an earlier report
    "open_html",        # --open: a browser
    "skip_non_models",  # pre-commit: which targets to skip
    "color", "quiet", "debug",  # the terminal
}

#: The command line's own settings that are also [tool.gradscope] keys.
SETTINGS_ONLY = {"fail_on", "input_shape", "dtype", "html", "json", "sarif", "targets",
                 "input_shapes"}


def analyze_params() -> dict[str, click.Parameter]:
    command = cli.main.commands["analyze"]
    return {p.name: p for p in command.params if p.name}


# ------------------------------------------------------------------ values per kind


def sample_value(f: Field[Any]) -> Any:
    """A TOML-writable value of the field that is not its default, from its declaration."""
    meta, default = f.metadata, settings_default_of(f)
    if meta["choices"]:
        return next(c for c in reversed(meta["choices"]) if c != default)
    kind = meta["kind"]
    if kind in ("switch", "flag"):
        return not default
    if kind == "float":
        return (default or 0.0) + 2.5
    if kind == "int":
        return (default or 0) + 2
    if kind == "text":
        return "logits" if default is None else f"{default}x"
    if kind == "codes":
        return ["GS1"]
    if kind == "pairs":
        return {"enc.*": ["GS101"]}
    if kind == "table":
        return {name: getattr(default, name) * 2 for name in THRESHOLDS}
    raise AssertionError(f"no sample value for kind {kind!r} of {f.name}: add one here")


def bad_value(f: Field[Any]) -> Any:
    """A value of the field's type or range that validation must refuse."""
    meta = f.metadata
    if meta["choices"]:
        return "nope"
    return {"switch": "yes", "flag": "yes", "float": -1.0, "int": "three", "text": 3.5,
            "codes": ["GS999"], "pairs": {"*": ["GS999"]}, "table": "strict"}[meta["kind"]]


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + "}"
    return json.dumps(value)  # true/false, numbers, strings and lists are TOML as JSON writes


def as_option_value(f: Field[Any], value: Any) -> Any:
    """The sample as the field holds it (lists as tuples, tables as their records)."""
    kind = f.metadata["kind"]
    if kind == "codes":
        return tuple(value)
    if kind == "pairs":
        return tuple((glob, tuple(codes)) for glob, codes in value.items())
    if kind == "table":
        return Thresholds(**value)
    return value


# ------------------------------------------------------------------ the checks, as functions


def cli_problems(option_names: tuple[str, ...], params: dict[str, click.Parameter]) -> list[str]:
    """What keeps the command line from matching the options, one line per problem."""
    problems = [f"field {name!r} has no 'gradscope analyze' option (add one, or list it in "
                "NO_CLI_OPTION with the reason)"
                for name in option_names if name not in params and name not in NO_CLI_OPTION]
    problems += [f"option {params[name].opts} is neither a field of AnalysisOptions nor in "
                 "CLI_ONLY" for name in params if name not in option_names and name not in CLI_ONLY]
    problems += [f"{name!r} is in NO_CLI_OPTION but has an option" for name in NO_CLI_OPTION
                 if name in params]
    problems += [f"{name!r} is in CLI_ONLY but is not an option" for name in CLI_ONLY
                 if name not in params]
    return problems


def default_problems(option_fields: tuple[Field[Any], ...]) -> list[str]:
    """Defaults that differ between the library and the settings without being declared."""
    problems = []
    for f in option_fields:
        library, settings = default_of(f), settings_default_of(f)
        if library != settings and SETTINGS_DEFAULT_DIFFERS.get(f.name, library) != settings:
            problems.append(f"{f.name}: default {library!r}, {settings!r} in the settings "
                            "(declare it in SETTINGS_DEFAULT_DIFFERS with the reason)")
        if library == settings and f.name in SETTINGS_DEFAULT_DIFFERS:
            problems.append(f"{f.name}: listed in SETTINGS_DEFAULT_DIFFERS, but it does not")
    return problems


# ------------------------------------------------------------------ the command line


def test_every_field_has_a_cli_option_and_every_option_a_field() -> None:
    assert cli_problems(OPTION_NAMES, analyze_params()) == []


def test_the_check_catches_a_new_field_without_an_option_and_a_stray_option() -> None:
    params = analyze_params()
    assert cli_problems((*OPTION_NAMES, "warmup_steps"), params) == [
        "field 'warmup_steps' has no 'gradscope analyze' option (add one, or list it in "
        "NO_CLI_OPTION with the reason)"]
    stray = click.Option(["--new-thing"])
    problems = cli_problems(OPTION_NAMES, {**params, "new_thing": stray})
    assert problems and "--new-thing" in problems[0]


def test_cli_options_follow_the_declaration() -> None:
    """Choices, defaults (None: the settings decide) and help come from gradscope.options."""
    params = analyze_params()
    for f in OPTION_FIELDS:
        if f.name in NO_CLI_OPTION:
            continue
        param = params[f.name]
        assert isinstance(param, click.Option)
        assert param.opts[0] == "--" + f.name.replace("_", "-"), param.opts
        if f.metadata["kind"] in ("codes", "pairs"):
            assert param.multiple, f.name
        else:
            assert param.default is None, (f.name, "a given option overrides the file")
        if f.metadata["choices"]:
            assert isinstance(param.type, click.Choice)
            assert tuple(param.type.choices) == f.metadata["choices"], f.name
        assert param.help is not None and param.help.startswith(f.metadata["help"]), f.name
        default = settings_default_of(f)
        if default is not None and default != () and not isinstance(default, bool):
            assert f"(default {default})" in param.help, (f.name, param.help)


def test_fail_on_choices_are_declared_once() -> None:
    from gradscope.report import SEVERITIES

    assert cli.FAIL_ON is FAIL_ON and config.FAIL_ON is FAIL_ON and testing.FAIL_ON is FAIL_ON
    assert (*SEVERITIES, "never") == FAIL_ON
    fail_on = analyze_params()["fail_on"]
    assert isinstance(fail_on.type, click.Choice) and tuple(fail_on.type.choices) == FAIL_ON


def test_every_cli_option_value_reaches_the_options(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each analysis option on the command line lands in the AnalysisOptions analyze gets."""
    monkeypatch.chdir(tmp_path)
    seen: list[AnalysisOptions] = []

    def spy(model: Any, inputs: Any, options: AnalysisOptions, **_: Any) -> Any:
        seen.append(options)
        raise ConfigError("stop here", "spy")

    monkeypatch.setattr(api, "analyze", spy)
    args: list[str] = []
    expected = {}
    for f in OPTION_FIELDS:
        if f.name in NO_CLI_OPTION:
            continue
        flag, value = "--" + f.name.replace("_", "-"), sample_value(f)
        kind = f.metadata["kind"]
        if kind == "switch":
            args.append(flag if value else f"--no-{flag[2:]}")
        elif kind == "flag":
            assert value is True, f.name
            args.append(flag)
        elif kind == "codes":
            args += [flag, ",".join(value)]
        elif kind == "pairs":
            for glob, codes in value.items():
                args += [flag, f"{glob}={','.join(codes)}"]
        else:
            args += [flag, str(value)]
        expected[f.name] = as_option_value(f, value)
    result = cli_runner().invoke(cli.main, ["analyze", str(UNHEALTHY), *args])
    assert "stop here" in result.stderr, (result.stderr, args)
    (options,) = seen
    for name, value in expected.items():
        got = getattr(options, name)
        assert got == value, (name, got, value)


# ------------------------------------------------------------------ [tool.gradscope]


def test_every_field_is_a_tool_gradscope_key_with_the_field_default(
        tmp_path: Path) -> None:
    assert Settings().analysis == settings_defaults()
    for f in OPTION_FIELDS:
        assert getattr(Settings().analysis, f.name) == settings_default_of(f), f.name
    lines = ["[tool.gradscope]"]
    expected = {}
    for f in OPTION_FIELDS:
        value = sample_value(f)
        lines.append(f"{f.name.replace('_', '-')} = {toml_value(value)}")
        expected[f.name] = as_option_value(f, value)
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = load_settings(tmp_path).options()
    for name, value in expected.items():
        assert getattr(options, name) == value, (name, getattr(options, name), value)


def test_tool_gradscope_keys_are_the_fields_and_the_settings() -> None:
    keys = set(OPTION_NAMES) - {"thresholds"} | set(THRESHOLDS) | SETTINGS_ONLY
    assert keys == config._KEYS
    own = {f.name for f in dataclasses.fields(Settings)} - {"analysis", "source"}
    assert own == SETTINGS_ONLY, "a setting of the command line is no option of the analysis"
    assert not own & set(OPTION_NAMES)


def test_a_bad_value_in_the_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    for f in OPTION_FIELDS:
        if f.metadata["kind"] == "table":
            continue
        value = bad_value(f)
        body = f"[tool.gradscope]\n{f.name.replace('_', '-')} = {toml_value(value)}\n"
        (tmp_path / "pyproject.toml").write_text(body, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_settings(tmp_path)
        line = info.value.one_line()
        assert "pyproject.toml" in line, (f.name, line)
        assert f.name.split("_")[0] in line.replace("-", "_"), (f.name, line)


# ------------------------------------------------------------------ gradscope.analyze


def test_api_takes_options_and_every_field_as_a_keyword() -> None:
    params = inspect.signature(api.analyze).parameters
    assert "options" in params
    assert params["options"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # No option is a parameter of its own: its default would be a second declaration.
    assert not set(params) & set(OPTION_NAMES), set(params) & set(OPTION_NAMES)
    assert api.AnalysisOptions is AnalysisOptions


#: Options the pipeline accepts but does not read, and why.
NOT_READ_BY_THE_PIPELINE: set[str] = set()


def test_api_reads_every_option() -> None:
    """analyze() unpacks each field (``opts.<name>``): a new field cannot be silently dropped."""
    source = inspect.getsource(api.analyze)
    unread = [name for name in OPTION_NAMES
              if f"opts.{name}" not in source and name not in NOT_READ_BY_THE_PIPELINE]
    assert unread == [], f"analyze() never reads {unread}"


def test_defaults_agree_across_library_and_settings() -> None:
    assert default_problems(OPTION_FIELDS) == []
    assert AnalysisOptions().device == "cpu" and settings_defaults().device == "auto"


def test_the_default_check_catches_an_undeclared_difference() -> None:
    field = dataclasses.field(default=3, metadata={**OPTION_FIELDS[0].metadata,
                                                   "settings_default": 4})
    field.name = "batches_cli"
    assert default_problems((field,)) and "batches_cli" in default_problems((field,))[0]


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_every_keyword_is_checked_before_anything_runs(name: str) -> None:
    """A bad value of each option is a ConfigError naming it: the keyword reached the record."""
    def factory() -> Any:
        raise AssertionError("the model must not be built for a bad option")

    f = next(f for f in OPTION_FIELDS if f.name == name)
    with pytest.raises(ConfigError) as info:
        api.analyze(factory, (), **{name: bad_value(f)})
    line = info.value.one_line()
    assert name.split("_")[0] in line.replace("-", "_") or "GS999" in line, (name, line)


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="learning_rate"):
        api.analyze(lambda: None, (), learning_rate=0.1)
    with pytest.raises(TypeError, match="options"):
        api.analyze(lambda: None, (), "cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="warmup"):
        AnalysisOptions().replaced(warmup=3)


def test_keywords_override_the_options_record() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    options = AnalysisOptions(probe=True, ignore=("GS8",), seed=3)
    report = api.analyze(model, (torch.randn(2, 4),), options, probe=False)
    assert report.probe.enabled is False
    assert options.probe is True, "the record given is not changed"


# ------------------------------------------------------------------ the record itself


def test_options_normalise_what_the_api_accepts() -> None:
    options = AnalysisOptions(select="GS1,gs8", ignore=None, output=0,  # type: ignore[arg-type]
                              per_module_ignore={"enc.*": ["GS101"]},  # type: ignore[arg-type]
                              thresholds=None)  # type: ignore[arg-type]
    assert options.select == ("GS1", "gs8") and options.ignore == ()
    assert options.output == "0"
    assert options.per_module_ignore == (("enc.*", ("GS101",)),)
    assert options.thresholds == Thresholds()
    hash(options)  # frozen and hashable: a record, not a bag


def test_every_field_has_one_line_help_and_a_known_kind() -> None:
    for f in OPTION_FIELDS:
        help_text = f.metadata["help"]
        assert help_text and "\n" not in help_text and not help_text.endswith("."), f.name
        assert f.metadata["kind"] in ("text", "float", "int", "switch", "flag", "codes",
                                      "pairs", "table"), f.name


def test_readme_thresholds_are_the_defaults() -> None:
    """The README's [tool.gradscope.thresholds] example says "the defaults": it must be."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("[tool.gradscope.thresholds]", 1)[1].split("```", 1)[0]
    values = {}
    for line in textwrap.dedent(block).splitlines()[1:]:
        key, _, rest = line.partition("=")
        if key.strip():
            values[key.strip().replace("-", "_")] = float(rest.split("#", 1)[0])
    assert values == {name: float(getattr(Thresholds(), name)) for name in THRESHOLDS}


def test_cli_end_to_end_with_an_options_record(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's run and the API's, given the same options, write the same findings."""
    from gradscope.loading import load_target

    monkeypatch.chdir(tmp_path)
    result = cli_runner().invoke(cli.main, ["analyze", str(UNHEALTHY), "--no-probe",
                                            "--ignore", "GS7", "--json", "-", "--fail-on",
                                            "never"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    loaded = load_target(str(UNHEALTHY), [], [])
    report = api.analyze(loaded.model, loaded.inputs,
                         AnalysisOptions(probe=False, ignore=("GS7",)))
    assert [f["rule"] for f in doc["findings"]] == [f.rule for f in report.findings]
