"""``[tool.gradscope]`` in the nearest pyproject.toml, below the CLI (docs/contract.md section 2).

A typo in a CI configuration must not silently turn a check off, so unknown
keys and ill-typed values are one-line errors (exit 2), never a crash.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from helpers import cli_runner

from gradscope.cli import main
from gradscope.config import Settings, find_pyproject, load_settings, validate
from gradscope.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
UNHEALTHY = SAMPLES / "deep_sigmoid_mlp.py"  # GS101: predicted ratio 2.15e-8
SMALL = SAMPLES / "tuple_output_mlp.py"

LINEAR_NO_INPUTS = "from torch import nn\n\ndef build_model():\n    return nn.Linear(16, 2)\n"


def write_pyproject(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(textwrap.dedent(body).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder as the working directory."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def analyze(*args: Any) -> Result:
    return cli_runner().invoke(main, ["analyze", *[str(a) for a in args]], catch_exceptions=False)


def assert_config_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradscope: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------ reading the file


def test_defaults_without_a_gradscope_table(project: Path) -> None:
    write_pyproject(project, '[project]\nname = "x"\n')
    assert load_settings() == Settings()


def test_settings_from_tool_gradscope(project: Path) -> None:
    path = write_pyproject(project, """
        [tool.gradscope]
        fail-on = "warning"
        device = "cpu"
        probe = false
        seed = 3
        lr = 0.01
        optimizer = "adamw"
        input-shape = ["8,16", "8,4"]
        dtype = "float64"
        json = "reports/gradscope.json"

        [tool.gradscope.thresholds]
        vanishing-warning = 0.05
        vanishing_error = 0.005
        exploding-warning = 50
        exploding-error = 500.0
        min-coverage = 0.5
    """)
    settings = load_settings()
    assert settings.source == str(path.resolve())
    assert (settings.fail_on, settings.device, settings.probe, settings.seed) == \
        ("warning", "cpu", False, 3)
    assert (settings.lr, settings.optimizer) == (0.01, "adamw")
    assert settings.input_shape == ("8,16", "8,4")
    assert settings.dtype == ("float64",)
    assert settings.json == "reports/gradscope.json"
    assert (settings.vanishing_warning, settings.vanishing_error) == (0.05, 0.005)
    assert (settings.exploding_warning, settings.exploding_error) == (50, 500.0)
    assert settings.min_coverage == 0.5


def test_thresholds_also_work_at_the_top_level(project: Path) -> None:
    write_pyproject(project, """
        [tool.gradscope]
        vanishing-warning = 0.2
    """)
    assert load_settings().vanishing_warning == 0.2


@pytest.mark.parametrize("toml,expected", [
    ('input-shape = "8,16"', ("8,16",)),
    ("input-shape = [8, 16]", ("8,16",)),
    ("input-shape = [[8, 16], [8, 4]]", ("8,16", "8,4")),
    ('input-shape = ["8,3,32,32", [8, 10]]', ("8,3,32,32", "8,10")),
])
def test_input_shape_spellings(project: Path, toml: str, expected: tuple[str, ...]) -> None:
    write_pyproject(project, f"[tool.gradscope]\n{toml}\n")
    assert load_settings().input_shape == expected


def test_nearest_pyproject_walking_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = write_pyproject(tmp_path / "repo", '[tool.gradscope]\nfail-on = "never"\n')
    deep = tmp_path / "repo" / "src" / "models" / "vision"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_pyproject(deep) == top
    settings = load_settings()
    assert settings.fail_on == "never"
    assert settings.source == str(top.resolve())
    # a nearer pyproject.toml wins over the one further up, even with no gradscope table
    nearer = write_pyproject(tmp_path / "repo" / "src", '[tool.gradscope]\nfail-on = "info"\n')
    assert find_pyproject(deep) == nearer
    assert load_settings().fail_on == "info"
    write_pyproject(tmp_path / "repo" / "src" / "models", '[project]\nname = "inner"\n')
    assert load_settings() == Settings()


def test_load_settings_takes_a_start_folder(tmp_path: Path) -> None:
    write_pyproject(tmp_path / "elsewhere", '[tool.gradscope]\nseed = 7\n')
    assert load_settings(tmp_path / "elsewhere").seed == 7


# ------------------------------------------------------------------ errors in the file


@pytest.mark.parametrize("body,fragments", [
    ('[tool.gradscope]\nfial-on = "never"\n', ["fial-on"]),
    ("[tool.gradscope]\nsource = 'x'\n", ["source"]),
    ("[tool.gradscope.thresholds]\nvanishing-warnign = 0.1\n", ["vanishing-warnign"]),
    ('[tool.gradscope.thresholds]\nfail-on = "never"\n', ["fail-on"]),
])
def test_unknown_key_is_an_error_naming_it(project: Path, body: str,
                                           fragments: list[str]) -> None:
    path = write_pyproject(project, body)
    with pytest.raises(ConfigError) as info:
        load_settings()
    line = info.value.one_line()
    for fragment in [*fragments, "unknown key", str(path.resolve())]:
        assert fragment in line


@pytest.mark.parametrize("body,fragment", [
    ('fail-on = "sometimes"', "fail-on"),
    ('seed = "abc"', "seed"),
    ('probe = "no"', "probe"),
    ('lr = "0.1"', "lr"),
    ("lr = -1.0", "lr"),
    ("device = 3", "device"),
    ('optimizer = "rmsprop"', "optimizer"),
    ('tracer = "magic"', "tracer"),
    ("json = false", "json"),
    ('input-shape = ["8,16", 3]', "input-shape"),
    ("input-shape = []", "input-shape"),
    ("dtype = 64", "dtype"),
    ("vanishing-warning = -0.1", "vanishing_warning"),
    ('vanishing-error = "small"', "vanishing_error"),
    ("min-coverage = true", "min_coverage"),
])
def test_ill_typed_values_are_config_errors(project: Path, body: str, fragment: str) -> None:
    write_pyproject(project, f"[tool.gradscope]\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert fragment in info.value.one_line()


def test_broken_toml_and_non_table(project: Path) -> None:
    write_pyproject(project, "[tool.gradscope\nfail-on = 'never'\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings()
    write_pyproject(project, "[tool]\ngradscope = 3\n")
    with pytest.raises(ConfigError, match="not a table"):
        load_settings()


def test_validate_accepts_the_defaults() -> None:
    validate(Settings())


def test_merged_ignores_options_not_given() -> None:
    base = Settings(fail_on="never", input_shape=("4,4",))
    merged = base.merged(fail_on=None, input_shape=(), device="cpu")
    assert merged.fail_on == "never"
    assert merged.input_shape == ("4,4",)
    assert merged.device == "cpu"


# ------------------------------------------------------------------ through the command line


def test_fail_on_from_the_file_sets_the_exit_code(project: Path) -> None:
    assert analyze(UNHEALTHY, "--no-probe", "-q").exit_code == 1
    write_pyproject(project, '[tool.gradscope]\nfail-on = "never"\n')
    assert analyze(UNHEALTHY, "--no-probe", "-q").exit_code == 0


@pytest.mark.slow
def test_thresholds_from_the_file_change_the_findings(project: Path) -> None:
    write_pyproject(project, """
        [tool.gradscope.thresholds]
        vanishing-warning = 1e-7
        vanishing-error = 1e-10
    """)
    result = analyze(UNHEALTHY, "--no-probe", "--json", "-")
    assert result.exit_code == 0, "the predicted 2e-8 is now only a warning"
    doc = json.loads(result.stdout)
    gradient = {(f["rule"], f["severity"]) for f in doc["findings"] if f["rule"] < "GS3"}
    assert gradient == {("GS101", "warning")}
    assert not [f for f in doc["findings"] if f["severity"] == "error"]
    write_pyproject(project, """
        [tool.gradscope.thresholds]
        vanishing-warning = 1e-9
        vanishing-error = 1e-10
    """)
    doc = json.loads(analyze(UNHEALTHY, "--no-probe", "--json", "-").stdout)
    assert not [f for f in doc["findings"] if f["rule"].startswith("GS1")]
    assert doc["status"] == "warning", "GS705 (sigmoid hidden units) is left"


def test_architecture_thresholds_from_the_file(project: Path) -> None:
    doc = json.loads(analyze(UNHEALTHY, "--no-probe", "--json", "-").stdout)
    assert "GS701" in {f["rule"] for f in doc["findings"]}, "10 plain layers, threshold 10"
    write_pyproject(project, """
        [tool.gradscope.thresholds]
        plain-depth = 11
    """)
    doc = json.loads(analyze(UNHEALTHY, "--no-probe", "--json", "-").stdout)
    assert "GS701" not in {f["rule"] for f in doc["findings"]}


def test_command_line_wins_over_the_file(project: Path) -> None:
    write_pyproject(project, """
        [tool.gradscope]
        fail-on = "never"
        probe = false
        json = "from_file.json"
    """)
    result = analyze(UNHEALTHY, "--fail-on", "error", "-q")
    assert result.exit_code == 1, "--fail-on error beats fail-on = never"
    assert (project / "from_file.json").exists(), "the file's json path applies"
    assert json.loads((project / "from_file.json").read_text())["probe"]["enabled"] is False
    result = analyze(SMALL, "--json", "from_cli.json", "--probe", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads((project / "from_cli.json").read_text())["probe"]["enabled"] is True, \
        "--probe beats probe = false"


def test_command_line_input_shape_wins_over_the_file(project: Path) -> None:
    write_pyproject(project, '[tool.gradscope]\ninput-shape = "2,99"\n')
    (project / "lin.py").write_text(LINEAR_NO_INPUTS)  # takes 16 features
    assert_config_error(analyze("lin.py", "--no-probe"), "[2, 99]")
    result = analyze("lin.py", "--input-shape", "3,16", "--no-probe", "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["inputs"] == [{"shape": [3, 16], "dtype": "float32"}]


def test_input_shape_and_dtype_from_the_file(project: Path) -> None:
    write_pyproject(project, '[tool.gradscope]\ninput-shape = [5, 16]\ndtype = "float64"\n')
    (project / "lin.py").write_text(LINEAR_NO_INPUTS.replace("Linear(16, 2)",
                                                             "Linear(16, 2).double()"))
    result = analyze("lin.py", "--no-probe", "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["inputs"] == [{"shape": [5, 16], "dtype": "float64"}]
    assert not any("inferred" in note for note in doc["notes"])


@pytest.mark.parametrize("body,fragment", [
    ('[tool.gradscope]\nfail-on-error = true\n', "fail-on-error"),
    ('[tool.gradscope]\nseed = "abc"\n', "seed"),
    ("[tool.gradscope]\ndevice = 0\n", "device"),
])
def test_bad_file_is_exit_2_with_one_line(project: Path, body: str, fragment: str) -> None:
    write_pyproject(project, body)
    assert_config_error(analyze(SMALL, "--no-probe"), fragment, "pyproject.toml")


def test_bad_file_fails_even_when_the_option_is_given(project: Path) -> None:
    """A broken configuration is reported, not masked by a command-line option."""
    write_pyproject(project, '[tool.gradscope]\nfail-on = "sometimes"\n')
    assert_config_error(analyze(SMALL, "--no-probe", "--fail-on", "never"), "sometimes")


# ------------------------------------------------------------------ targets and input-shapes


CONV_NO_INPUTS = ("from torch import nn\n\ndef build_model():\n"
                  "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())\n")


def make_models(folder: Path) -> None:
    for rel in ("models/a.py", "models/b.py", "nets/deep/c.py", "nets/d.py"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(LINEAR_NO_INPUTS)
    (folder / "models" / "notes.txt").write_text("not a model")


def test_targets_globs_sorted_and_deduplicated(project: Path) -> None:
    from gradscope.config import resolve_targets

    make_models(project)
    write_pyproject(project, """
        [tool.gradscope]
        targets = ["nets/**/*.py", "models/*.py", "models/a.py"]
    """)
    settings = load_settings()
    assert settings.targets == ("nets/**/*.py", "models/*.py", "models/a.py")
    assert resolve_targets(settings) == ("models/a.py", "models/b.py", "nets/d.py",
                                         "nets/deep/c.py")


def test_targets_are_relative_to_the_pyproject_folder(project: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from gradscope.config import resolve_targets

    make_models(project)
    write_pyproject(project, '[tool.gradscope]\ntargets = "models/*.py"\n')
    monkeypatch.chdir(project / "nets" / "deep")
    assert resolve_targets(load_settings()) == (str(project / "models" / "a.py"),
                                                str(project / "models" / "b.py"))
    monkeypatch.chdir(project / "models")
    assert resolve_targets(load_settings()) == ("a.py", "b.py")


def test_a_target_glob_matching_nothing_is_an_error_naming_it(project: Path) -> None:
    make_models(project)
    write_pyproject(project, '[tool.gradscope]\ntargets = ["models/*.py", "modles/*.py"]\n')
    line = assert_config_error(analyze("--no-probe"), "modles/*.py", "matches no file")
    assert "models/*.py'" not in line


@pytest.mark.parametrize("body", ["targets = []", "targets = 3", 'targets = ["ok.py", 1]',
                                  'targets = [""]'])
def test_ill_typed_targets(project: Path, body: str) -> None:
    write_pyproject(project, f"[tool.gradscope]\n{body}\n")
    with pytest.raises(ConfigError, match="targets"):
        load_settings()


def test_no_target_and_no_targets_setting_is_exit_2(project: Path) -> None:
    write_pyproject(project, '[tool.gradscope]\nfail-on = "never"\n')
    assert_config_error(analyze("--no-probe"), "no target", "targets")


def test_analyze_without_arguments_runs_the_targets(project: Path) -> None:
    make_models(project)
    write_pyproject(project, """
        [tool.gradscope]
        targets = ["models/*.py"]
        input-shape = "4,16"
        json = "out/report.json"
    """)
    (project / "out").mkdir()
    result = analyze("--no-probe", "-q")
    assert result.exit_code == 0, result.stderr
    for stem in ("a", "b"):
        doc = json.loads((project / "out" / f"report.{stem}.json").read_text())
        assert doc["model"]["inputs"] == [{"shape": [4, 16], "dtype": "float32"}]
    assert not (project / "out" / "report.d.json").exists()
    # a target on the command line replaces the setting
    result = analyze("nets/d.py", "--input-shape", "2,16", "--no-probe", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["name"].startswith("d")


def test_input_shapes_per_target(project: Path) -> None:
    make_models(project)
    (project / "models" / "cnn.py").write_text(CONV_NO_INPUTS)
    write_pyproject(project, """
        [tool.gradscope]
        targets = ["models/*.py"]
        input-shape = "2,16"                # everything not matched below
        [tool.gradscope.input-shapes]
        "models/cnn.py" = ["8,3,32,32"]
        "models/b*.py" = [[5, 16]]
    """)
    settings = load_settings()
    assert settings.input_shapes == (("models/cnn.py", ("8,3,32,32",)),
                                     ("models/b*.py", ("5,16",)))
    result = analyze("--no-probe", "-q", "--json", "r.json")
    assert result.exit_code == 0, result.stderr
    shapes = {stem: json.loads((project / f"r.{stem}.json").read_text())["model"]["inputs"][0]
              ["shape"] for stem in ("a", "b", "cnn")}
    assert shapes == {"a": [2, 16], "b": [5, 16], "cnn": [8, 3, 32, 32]}
    # the same with the path as given on the command line, from another folder, or NAME
    result = analyze(project / "models" / "cnn.py", "--no-probe", "--json", "-")
    assert json.loads(result.stdout)["model"]["inputs"][0]["shape"] == [8, 3, 32, 32]
    result = analyze("models/b.py:build_model", "--no-probe", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["inputs"][0]["shape"] == [5, 16]


def test_command_line_input_shape_wins_over_input_shapes(project: Path) -> None:
    make_models(project)
    write_pyproject(project, """
        [tool.gradscope.input-shapes]
        "models/*.py" = ["2,99"]
    """)
    assert_config_error(analyze("models/a.py", "--no-probe"), "[2, 99]")
    result = analyze("models/a.py", "--input-shape", "3,16", "--no-probe", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["inputs"][0]["shape"] == [3, 16]


def test_exact_path_beats_an_earlier_glob(project: Path) -> None:
    from gradscope.config import shapes_for

    make_models(project)
    write_pyproject(project, """
        [tool.gradscope.input-shapes]
        "models/*.py" = ["1,16"]
        "models/a.py" = ["7,16"]
        "nets/**/*.py" = ["9,16"]
    """)
    settings = load_settings()
    assert shapes_for(settings, "models/a.py") == ("7,16",)
    assert shapes_for(settings, "models/b.py") == ("1,16",)
    assert shapes_for(settings, "nets/deep/c.py") == ("9,16",)
    assert shapes_for(settings, "elsewhere.py") is None
    assert shapes_for(settings, "torchvision.models:resnet18") is None


@pytest.mark.parametrize("body,fragment", [
    ('[tool.gradscope]\ninput-shapes = "8,16"\n', "input-shapes"),
    ('[tool.gradscope.input-shapes]\n"a.py" = [true]\n', "'a.py'"),
    ('[tool.gradscope.input-shapes]\n"a.py" = []\n', "'a.py'"),
    ('[tool.gradscope]\ninput-shape-for = {}\n', "input-shape-for"),
    ('[tool.gradscope]\ntarget = ["a.py"]\n', "target"),
])
def test_bad_input_shapes_name_the_key(project: Path, body: str, fragment: str) -> None:
    write_pyproject(project, body)
    assert_config_error(analyze(SMALL, "--no-probe"), fragment, "pyproject.toml")


# ------------------------------------------------------------------ the other keys, end to end


def test_device_select_and_ignore_from_the_file(project: Path) -> None:
    write_pyproject(project, """
        [tool.gradscope]
        device = "cpu"
        fail-on = "warning"
        select = ["GS1", "GS7"]
        ignore = ["GS101"]
    """)
    result = analyze(UNHEALTHY, "--json", "-")
    doc = json.loads(result.stdout)
    assert doc["probe"]["device"] == "cpu"
    rules = {f["rule"] for f in doc["findings"]}
    assert rules and all(r.startswith(("GS1", "GS7")) for r in rules)
    assert "GS101" not in rules
    assert result.exit_code == 1, "GS705 is a warning and fail-on = warning"
    result = analyze(UNHEALTHY, "--ignore", "GS7", "--json", "-")
    assert "GS101" in {f["rule"] for f in json.loads(result.stdout)["findings"]}, \
        "--ignore replaces the file's list"
    assert analyze(UNHEALTHY, "--select", "GS7", "--fail-on", "error", "-q").exit_code == 0, \
        "only GS7xx (no error among them) and --fail-on error beat the file"
