"""Output for CI: ``--format github|json`` and the example GitHub Actions workflow.

GitHub reads workflow commands (``::error file=...::message``) from any line of
a job's log, so a model name or exception text printed raw could end an
annotation early or forge another command (``::add-mask::``,
``::stop-commands::``). The escaping tests feed hostile strings through the
renderer and decode them the way the runner does.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from helpers import cli_runner

from gradscope.cli import main
from gradscope.render.github import (
    annotation,
    display_path,
    escape_data,
    escape_property,
    render_github,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
UNHEALTHY = SAMPLES / "deep_sigmoid_mlp.py"
HEALTHY = SAMPLES / "relu_mlp_kaiming.py"
SMALL = SAMPLES / "tuple_output_mlp.py"
WORKFLOW = REPO / "examples" / "github-actions.yml"

COMMAND_RE = re.compile(r"^::(error|warning|notice)(?: ([^:]*))?::(.*)$")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "user-project"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def analyze(*args: Any) -> Result:
    return cli_runner().invoke(main, ["analyze", *[str(a) for a in args]],
                               catch_exceptions=False)


def unescape(text: str) -> str:
    """What the runner does to a message or property value (%25 last, as it does)."""
    for code, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(code, char)
    return text


def parse(line: str) -> tuple[str, dict[str, str], str]:
    """One workflow command: (command, properties, message), values unescaped."""
    match = COMMAND_RE.match(line)
    assert match, line
    props: dict[str, str] = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        props[key] = unescape(value)
    return match.group(1), props, unescape(match.group(3))


# ------------------------------------------------------------------ escaping


HOSTILE = [
    "100% dead",
    "line one\nline two",
    "cr\rlf\r\n",
    "::error::forged",
    "a\n::add-mask::secret",
    "x\n::stop-commands::token",
    "%0A already encoded %25",
    "key=value,file=other.py:1",
    "\x1b[31mred\x1b[0m and \x1b]8;;http://x\x07link\x1b]8;;\x07",
    "bell\x07 nul\x00 del\x7f tab\tend",
    "trojan \u202eevil\u202c source",
    "unicode line\u2028sep",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_message_is_one_line_and_round_trips(text: str) -> None:
    escaped = escape_data(text)
    assert "\n" not in escaped and "\r" not in escaped
    assert "\x1b" not in escaped and "\x00" not in escaped and "\u202e" not in escaped
    # every % is one of the runner's escapes, so decoding cannot be fooled
    assert re.fullmatch(r"(?:[^%]|%25|%0D|%0A)*", escaped), escaped
    expected = re.sub(r"\x1b\[[0-9;]*m|\x1b\]8;;[^\x07]*\x07", "", text)
    expected = re.sub(r"[\t\u2028]", " ", expected)
    expected = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e]", "", expected)
    assert unescape(escaped) == expected


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_property_has_no_separators(text: str) -> None:
    escaped = escape_property(text)
    assert not set(escaped) & {"\n", "\r", ":", ","}
    assert re.fullmatch(r"(?:[^%]|%25|%0D|%0A|%3A|%2C)*", escaped), escaped
    assert unescape(escaped) == unescape(escape_data(text))


def test_escape_examples() -> None:
    assert escape_data("50%\r\nnext: a,b") == "50%25%0D%0Anext: a,b"
    assert escape_property("50%\r\nnext: a,b") == "50%25%0D%0Anext%3A a%2Cb"
    assert escape_data("%0A") == "%250A", "an encoded-looking input stays literal"


def finding(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rule": "GS101", "category": "vanishing-gradient", "severity": "error",
        "message": "Vanishing gradient", "location": {"module": "0", "node": "_0",
                                                       "file": None, "line": None},
        "recommendations": [{"kind": "init", "text": "Use Kaiming init."}],
    }
    base.update(over)
    return base


def test_annotation_shape(tmp_path: Path) -> None:
    model = tmp_path / "models" / "net.py"
    f = finding(location={"module": "enc", "file": str(model), "line": 12})
    line = annotation(f, cwd=tmp_path)
    assert line == ("::error file=models/net.py,line=12,title=GS101 vanishing-gradient-predicted"
                    "::Vanishing gradient Fix: Use Kaiming init.")
    assert annotation(finding(severity="warning"), cwd=tmp_path).startswith("::warning title=")
    assert annotation(finding(severity="info"), cwd=tmp_path).startswith("::notice title=")


def test_unknown_location_omits_file_and_line(tmp_path: Path) -> None:
    line = annotation(finding(), cwd=tmp_path)
    assert line.startswith("::error title=GS101 vanishing-gradient-predicted::")
    assert "file=" not in line and "line=" not in line
    # a line without a file is meaningless to GitHub: dropped with the file
    line = annotation(finding(location={"file": None, "line": 7}), cwd=tmp_path)
    assert "line=" not in line


def test_model_file_stands_in_for_a_finding_without_one(tmp_path: Path) -> None:
    doc = {"model": {"source": str(tmp_path / "m.py")}, "findings": [finding()]}
    command, props, _ = parse(render_github(doc, cwd=tmp_path).rstrip("\n"))
    assert command == "error"
    assert props == {"file": "m.py", "title": "GS101 vanishing-gradient-predicted"}


def test_paths_outside_the_working_directory_stay_absolute(tmp_path: Path) -> None:
    outside = tmp_path.parent / "elsewhere" / "m.py"
    assert display_path(str(outside), cwd=tmp_path) == str(outside.resolve())
    assert display_path("sub/m.py", cwd=tmp_path) == "sub/m.py"


def test_hostile_finding_is_one_command_that_decodes_back(tmp_path: Path) -> None:
    evil_file = tmp_path / "odd, name: x%.py"
    message = "ratio 1e-9\n::add-mask::hunter2\r\n::error file=x.py::fake 100%"
    doc = {"findings": [finding(message=message, recommendations=[],
                                location={"file": str(evil_file), "line": 3},
                                rule="GS999")]}
    out = render_github(doc, cwd=tmp_path)
    lines = out.splitlines()
    assert len(lines) == 1, out
    command, props, text = parse(lines[0])
    assert command == "error"
    assert props == {"file": "odd, name: x%.py", "line": "3", "title": "GS999"}
    assert text == message


def test_no_findings_no_output() -> None:
    assert render_github({"findings": []}) == ""


# ------------------------------------------------------------------ through the command line


def test_format_github_on_an_unhealthy_model(tmp_path: Path) -> None:
    model = tmp_path / "models" / UNHEALTHY.name
    model.parent.mkdir()
    model.write_text(UNHEALTHY.read_text())
    result = analyze(model, "--no-probe", "--format", "github")
    assert result.exit_code == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("::") for line in lines), result.stdout
    parsed = [parse(line) for line in lines]
    errors = [p for p in parsed if p[0] == "error"]
    assert errors, "GS101 is an error"
    _, props, text = errors[0]
    assert props["title"] == "GS101 vanishing-gradient-predicted"
    assert props["file"] == "models/deep_sigmoid_mlp.py", "relative to the working directory"
    assert "Vanishing gradient" in text
    assert {p[0] for p in parsed} <= {"error", "warning", "notice"}
    doc = json.loads(analyze(model, "--no-probe", "--json", "-").stdout)
    assert len(lines) == len(doc["findings"]), "one command per finding"
    outside = analyze(UNHEALTHY, "--no-probe", "--format", "github")
    assert f"file={UNHEALTHY}," in outside.stdout, "outside the working directory: absolute"


def test_format_github_keeps_the_exit_codes() -> None:
    healthy = analyze(HEALTHY, "--no-probe", "--format", "github")
    assert healthy.exit_code == 0, healthy.stderr
    assert all(line.startswith("::") for line in healthy.stdout.splitlines())
    assert analyze(UNHEALTHY, "--no-probe", "--format", "github", "--fail-on", "never") \
        .exit_code == 0
    assert analyze("no_such_model.py", "--format", "github").exit_code == 2


def test_format_github_with_reports_and_two_targets(tmp_path: Path) -> None:
    result = analyze(UNHEALTHY, SMALL, "--no-probe", "--format", "github",
                     "--sarif", tmp_path / "out.sarif", "--html", tmp_path / "out.html")
    assert result.exit_code == 1, result.stderr
    assert all(line.startswith("::") for line in result.stdout.splitlines()), result.stdout
    assert (tmp_path / "out.deep_sigmoid_mlp.sarif").is_file()
    assert (tmp_path / "out.tuple_output_mlp.html").is_file()


def test_format_json_is_json_dash() -> None:
    by_format = analyze(UNHEALTHY, "--no-probe", "--format", "json")
    by_option = analyze(UNHEALTHY, "--no-probe", "--json", "-")
    assert by_format.exit_code == by_option.exit_code == 1
    assert json.loads(by_format.stdout) == json.loads(by_option.stdout)


def test_format_json_also_writes_a_json_file(tmp_path: Path) -> None:
    result = analyze(SMALL, "--no-probe", "--format", "json", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize("args,fragment", [
    (["--format", "github", "--json", "-"], "--format github"),
    (["--format", "json", "--sarif", "-"], "--format json"),
    (["--format", "xml"], "xml"),
])
def test_stdout_conflicts_are_usage_errors(args: list[str], fragment: str) -> None:
    result = analyze(SMALL, "--no-probe", *args)
    assert result.exit_code == 2
    assert fragment in result.stderr


def test_format_json_with_two_targets_is_refused() -> None:
    result = analyze(SMALL, UNHEALTHY, "--no-probe", "--format", "json")
    assert result.exit_code == 2
    assert "--format json" in result.stderr


# ------------------------------------------------------------------ the example workflow


def _analyze_help() -> str:
    result = cli_runner().invoke(main, ["analyze", "--help"])
    assert result.exit_code == 0
    return result.stdout


def _workflow_steps() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    jobs = data["jobs"]
    assert len(jobs) == 1
    (job,) = jobs.values()
    steps = job["steps"]
    assert isinstance(steps, list)
    return steps


def _analyze_argv(run: str) -> list[str]:
    lines = [line for line in run.replace("\\\n", " ").splitlines()
             if line.strip().startswith("gradscope analyze")]
    assert len(lines) == 1, run
    return shlex.split(lines[0])


def test_workflow_runs_analyze_with_flags_the_cli_has() -> None:
    steps = _workflow_steps()
    runs = [s for s in steps if "gradscope analyze" in str(s.get("run", ""))]
    assert len(runs) == 1
    argv = _analyze_argv(runs[0]["run"])
    flags = [a for a in argv if a.startswith("--")]
    assert {"--format", "--sarif", "--html"} <= set(flags)
    help_text = _analyze_help()
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), flag
    options = dict(itertools.pairwise(argv))
    assert options["--format"] == "github"
    assert options["--sarif"] == "gradscope.sarif"
    assert options["--html"] == "gradscope.html"

    installs = " ".join(str(s.get("run", "")) for s in steps)
    assert "download.pytorch.org/whl/cpu" in installs and "gradscope" in installs
    assert any(str(s.get("uses", "")).startswith("actions/setup-python@") for s in steps)

    (sarif,) = [s for s in steps if str(s.get("uses", "")).startswith(
        "github/codeql-action/upload-sarif@")]
    assert sarif["if"] == "always()"
    assert sarif["with"]["sarif_file"] == options["--sarif"]
    (artifact,) = [s for s in steps if str(s.get("uses", "")).startswith(
        "actions/upload-artifact@")]
    assert artifact["if"] == "always()"
    assert artifact["with"]["path"] == options["--html"]
    order = [steps.index(s) for s in (runs[0], sarif, artifact)]
    assert order == sorted(order), "the uploads come after the analysis"


def test_workflow_text_structure() -> None:
    """The same without pyyaml: the steps are there, in order."""
    text = WORKFLOW.read_text(encoding="utf-8")
    assert "\t" not in text
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    needles = ["actions/setup-python@", "download.pytorch.org/whl/cpu",
               "gradscope analyze", "--format github", "--sarif gradscope.sarif",
               "--html gradscope.html", "github/codeql-action/upload-sarif@",
               "sarif_file: gradscope.sarif", "actions/upload-artifact@", "path: gradscope.html"]
    positions = [text.find(n) for n in needles]
    assert -1 not in positions, [n for n, p in zip(needles, positions, strict=True) if p < 0]
    assert positions == sorted(positions)
    assert text.count("if: always()") >= 2
    assert "security-events: write" in text


# ------------------------------------------------------------------ no torch


def test_github_renderer_does_not_import_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        from gradscope.render.github import render_github
        doc = {"findings": [{"rule": "GS101", "severity": "error", "message": "m",
                             "location": {"file": "a.py", "line": 1}}]}
        assert render_github(doc).startswith("::error file=a.py,line=1,")
        assert "torch" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ------------------------------------------------------------------ start-up


LIGHT_FORBIDDEN = ("torch", "numpy", "networkx", "jinja2", "tomllib", "gradscope.config",
                   "gradscope.report", "gradscope.rules.selection")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["-V"], ["rules"],
                                  ["analyze", "--help"]])
def test_light_commands_import_only_click_and_the_cli(tmp_path: Path, args: list[str]) -> None:
    """What --help, --version and rules import beyond click: no settings, no report model."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradscope", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    if args[0] in ("--help", "--version", "-V"):
        # gradscope._entry answers these without click (docs/benchmarks.md, section 5)
        assert "click" not in imported and "gradscope.cli" not in imported
    else:
        assert "gradscope.cli" in imported
    leaked = sorted(m for m in imported
                    if any(m == f or m.startswith(f + ".") for f in LIGHT_FORBIDDEN))
    assert not leaked, leaked


def test_cli_fail_on_choices_are_the_settings() -> None:
    from gradscope import cli, config

    assert cli.FAIL_ON == config.FAIL_ON


def test_startup_benchmark_lists_the_commands() -> None:
    text = (REPO / "benchmarks" / "startup.py").read_text(encoding="utf-8")
    for needle in ('"python -c pass"', '"gradscope --help"', '"python -m gradscope --help"',
                   '"gradscope rules"', '"gradscope --version"', "--json", "--repeat"):
        assert needle in text, needle
