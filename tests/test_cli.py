"""The command line as users, pre-commit hooks and CI scripts meet it (docs/contract.md section 2).

Most cases run in-process through click's CliRunner (torch is imported once);
the few that only a real process can show (the exit status seen by a shell,
``python -m gradscope``, what a pipe receives, which modules get imported)
run ``python -m gradscope`` in a subprocess. Every test runs in a temporary
working directory holding its own pyproject.toml, so no ``[tool.gradscope]``
of the repository or of a parent folder leaks in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import cli_runner

import gradscope
from gradscope.cli import main
from gradscope.rules.registry import RULES, TABLE_START, markdown_table, replace_table
from gradscope.schema import validate_report

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
HEALTHY = SAMPLES / "relu_mlp_kaiming.py"
UNHEALTHY = SAMPLES / "deep_sigmoid_mlp.py"
WARNING_MODEL = """
import torch
from torch import nn


class CumulativeMLP(nn.Module):
    \"\"\"Healthy but for ops the estimator does not model: coverage below 90% (GS802).\"\"\"

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x).cumsum(-1).cummax(-1).values)


def example_inputs():
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
"""
TWO_INPUTS = SAMPLES / "two_input_model.py"
SMALL = SAMPLES / "tuple_output_mlp.py"

ANSI = "\x1b["

LINEAR_MODEL = textwrap.dedent("""
    from torch import nn

    def build_model():
        return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
""")

TWO_CLASSES = textwrap.dedent("""
    from torch import nn

    class Alpha(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    class Beta(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    def example_inputs():
        import torch
        return torch.randn(2, 4)
""")

ONE_CLASS = textwrap.dedent("""
    import torch
    from torch import nn

    class Gamma(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    def example_inputs():
        return torch.randn(2, 4)
""")


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose nearest pyproject.toml has no [tool.gradscope]."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "user-project"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return tmp_path


def write_model(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    return path


def invoke(*args: Any) -> Result:
    return cli_runner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def analyze(*args: Any) -> Result:
    return invoke("analyze", *args)


def assert_one_line_error(stderr: str, stdout: str, *fragments: str) -> str:
    """Exit-2 output of the contract: one line on stderr, no traceback, nothing on stdout."""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("gradscope: error: "), line
    assert "Traceback" not in stderr
    assert stdout == "", stdout
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def assert_usage_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    return assert_one_line_error(result.stderr, result.stdout, *fragments)


def run_cli(*args: Any, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m gradscope ...`` in a real process, stdout and stderr as pipes (no TTY)."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NO_COLOR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "gradscope", *[str(a) for a in args]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def json_stdout(result: Result) -> dict[str, Any]:
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


# ------------------------------------------------------------------ no torch for light commands


def test_help_version_and_rules_do_not_import_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from gradscope.cli import main

        for args in (["--help"], ["--version"], ["-V"], ["rules"], ["rules", "GS101"],
                     ["analyze", "--help"], ["rules", "--help"], ["view", "--help"],
                     ["diff", "--help"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (args, result.output)
            assert result.output.strip(), args
            leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
            assert not leaked, (args, leaked[:5])
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["rules"]])
def test_real_process_light_commands_never_import_torch(tmp_path: Path, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradscope", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert imported, "no -X importtime output"
    assert "torch" not in imported
    # --help and --version are answered by gradscope._entry without the click CLI
    assert ("gradscope.cli" in imported) != (args in (["--help"], ["--version"]))


# ------------------------------------------------------------------ version, help, rules


def test_version_and_help() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert gradscope.__version__ in result.stdout
    result = invoke("--help")
    assert result.exit_code == 0
    assert "analyze" in result.stdout and "rules" in result.stdout and "view" in result.stdout
    result = invoke("analyze", "--help")
    for option in ("--input-shape", "--dtype", "--device", "--no-probe", "--fail-on", "--json",
                   "--html", "--sarif", "--lr", "--optimizer", "--output", "--open"):
        assert option in result.stdout, option


def test_rules_lists_every_code_with_its_summary() -> None:
    result = invoke("rules")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    codes = [line.split()[0] for line in lines if line.strip()]
    assert sorted(codes) == sorted(RULES), "every registered rule, once each"
    assert codes == sorted(codes)
    for line in lines:
        rule = RULES[line.split()[0]]
        assert rule.summary in line
        assert rule.severity in line


@pytest.mark.parametrize("code", ["GS101", "gs101"])
def test_rules_explains_one_rule(code: str) -> None:
    result = invoke("rules", code)
    assert result.exit_code == 0
    rule = RULES["GS101"]
    assert result.stdout.startswith("GS101")
    for text in (rule.summary, rule.name, "How to fix", rule.fix[:40]):
        assert text in result.stdout


def test_rules_unknown_code_exits_2_with_one_line() -> None:
    result = invoke("rules", "GS999")
    assert_usage_error(result, "GS999")


# ------------------------------------------------------------------ exit codes


def test_exit_code_0_for_a_healthy_model() -> None:
    result = analyze(HEALTHY)
    assert result.exit_code == 0, result.stderr
    assert "HEALTHY" in result.stdout
    assert ANSI not in result.stdout


def test_exit_code_1_for_an_unhealthy_model() -> None:
    result = analyze(UNHEALTHY, "--no-probe")
    assert result.exit_code == 1, result.stderr
    assert "UNHEALTHY" in result.stdout
    assert "GS101" in result.stdout


def test_fail_on_never_exits_0_for_an_unhealthy_model() -> None:
    result = analyze(UNHEALTHY, "--no-probe", "--fail-on", "never")
    assert result.exit_code == 0
    assert "UNHEALTHY" in result.stdout, "the findings are still shown"


def test_fail_on_warning_counts_warnings(tmp_path: Path) -> None:
    WARNING = write_model(tmp_path, "warns.py", WARNING_MODEL)
    default = analyze(WARNING, "--json", "-")
    assert default.exit_code == 0, "a warning is below the default --fail-on error"
    doc = json_stdout(default)
    assert doc["status"] == "warning"
    assert any(f["severity"] == "warning" for f in doc["findings"])
    assert not any(f["severity"] == "error" for f in doc["findings"])
    assert analyze(WARNING, "--fail-on", "warning", "-q").exit_code == 1
    assert analyze(WARNING, "--fail-on", "info", "-q").exit_code == 1


def test_bad_fail_on_value_is_a_usage_error() -> None:
    assert analyze(HEALTHY, "--fail-on", "sometimes").exit_code == 2


def test_no_target_is_a_usage_error() -> None:
    assert invoke("analyze").exit_code == 2


def test_quiet_prints_nothing_but_keeps_the_exit_code() -> None:
    result = analyze(UNHEALTHY, "--no-probe", "-q")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == ""


# ------------------------------------------------------------------ bad input: exit 2, one line


ERROR_CASES: dict[str, tuple[str | None, list[str], list[str]]] = {
    # name: (model source or None for "no file", extra args, fragments of the message)
    "missing_file": (None, [], ["no such file", "model.py"]),
    "syntax_error": ("import torch\n\ndef build_model(:\n    pass\n", [],
                     ["syntax error", "model.py:3"]),
    "import_error": ("import torch\nimport not_a_module_xyz\n", [],
                     ["not_a_module_xyz", "line 2"]),
    "no_model": ("import torch\n\nWIDTH = 3\n", [], ["no model found"]),
    "only_classes_with_arguments": (
        "from torch import nn\n\nclass NeedsArgs(nn.Module):\n"
        "    def __init__(self, width):\n        super().__init__()\n", [],
        ["no model found", "NeedsArgs"]),
    "several_candidates": (TWO_CLASSES, [], ["Alpha", "Beta"]),
    "factory_raises": (
        "def build_model():\n    raise RuntimeError('factory exploded on purpose')\n", [],
        ["build_model()", "factory exploded on purpose"]),
    "factory_returns_no_module": ("def build_model():\n    return 42\n", [],
                                  ["build_model()", "int", "nn.Module"]),
    "no_inputs": (
        "import torch\nfrom torch import nn\n\nclass Scale(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.w = nn.Parameter(torch.ones(3))\n\n"
        "    def forward(self, x):\n        return x * self.w\n", [],
        ["no example inputs", "--input-shape", "example_inputs()"]),
    "example_inputs_raises": (
        LINEAR_MODEL + "\ndef example_inputs():\n    raise ValueError('no data here')\n", [],
        ["example_inputs()", "no data here"]),
    "rejected_shape": (LINEAR_MODEL, ["--input-shape", "4,7"],
                       ["[4, 7]", "mat1 and mat2 shapes cannot be multiplied"]),
    "bad_shape_text": (LINEAR_MODEL, ["--input-shape", "4,x"], ["4,x"]),
    "unknown_dtype": (LINEAR_MODEL, ["--input-shape", "4,16", "--dtype", "complex999"],
                      ["complex999"]),
    "dtype_count": (LINEAR_MODEL, ["--input-shape", "4,16", "--dtype", "int64", "--dtype",
                                   "float32", "--dtype", "float32"], ["3 --dtype"]),
    "device_cuda_7": (LINEAR_MODEL, ["--device", "cuda:7"], ["cuda:7"]),
    "device_tpu": (LINEAR_MODEL, ["--device", "tpu"], ["tpu"]),
    "missing_name": (LINEAR_MODEL, [":nothere"], ["nothere"]),
    "unknown_module": (None, ["nosuchpkg_xyz_123:Net"], ["nosuchpkg_xyz_123"]),
}


def _error_case_args(tmp_path: Path, case: str) -> list[str]:
    source, extra, _ = ERROR_CASES[case]
    target = str(tmp_path / "model.py")
    if source is not None:
        write_model(tmp_path, "model.py", source)
    if extra and extra[0].startswith(":"):
        return [target + extra[0], *extra[1:]]
    if extra and ":" in extra[0]:
        return extra
    return [target, *extra]


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path: Path, case: str) -> None:
    result = analyze(*_error_case_args(tmp_path, case))
    assert_usage_error(result, *ERROR_CASES[case][2])


@pytest.mark.parametrize("case", ["syntax_error", "factory_raises", "rejected_shape"])
def test_debug_shows_the_traceback(tmp_path: Path, case: str) -> None:
    result = analyze(*_error_case_args(tmp_path, case), "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("gradscope: error: ")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this machine has CUDA, so --device cuda is valid here")
def test_cuda_without_a_gpu_exits_2(tmp_path: Path) -> None:
    model = write_model(tmp_path, "model.py", LINEAR_MODEL)
    assert_usage_error(analyze(model, "--device", "cuda"), "cuda")


def test_output_key_not_in_the_model_output_lists_the_keys() -> None:
    result = analyze(TWO_INPUTS, "--output", "nope", "--no-probe")
    assert_usage_error(result, "nope", "logits", "features")


@pytest.mark.parametrize("option,where", [
    ("--json", "inside_a_file/x.json"),
    ("--html", "no_such_dir/report.html"),
    ("--sarif", "a_directory"),
])
def test_unwritable_output_fails_before_the_analysis(tmp_path: Path, option: str,
                                                     where: str) -> None:
    model = write_model(tmp_path, "model.py", """
        import pathlib
        from torch import nn

        def build_model():
            pathlib.Path(__file__).with_name("built.marker").write_text("built")
            return nn.Sequential(nn.Linear(16, 2))
    """)
    (tmp_path / "inside_a_file").write_text("a regular file")
    (tmp_path / "a_directory").mkdir()
    result = analyze(model, option, tmp_path / where)
    assert_usage_error(result, "cannot write", where.split("/")[0])
    assert not (tmp_path / "built.marker").exists(), "the model was built before the check"


def test_internal_error_exits_2_not_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 1 means "findings" to CI: a crash inside gradscope must not look like one."""
    import gradscope.api

    def boom(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("kaboom from inside gradscope")

    monkeypatch.setattr(gradscope.api, "analyze", boom)
    result = analyze(SMALL, "--no-probe")
    assert result.exit_code == 2
    assert "kaboom from inside gradscope" in result.stderr
    assert "Traceback" in result.stderr, "a bug keeps its traceback for the report"


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradscope.api

    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gradscope.api, "analyze", interrupted)
    result = analyze(SMALL)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr


# ------------------------------------------------------------------ outputs


def test_json_to_stdout_is_the_only_thing_on_stdout() -> None:
    result = analyze(SMALL, "--json", "-", "--no-probe")
    assert result.exit_code == 0, result.stderr
    doc = json_stdout(result)  # the whole of stdout parses
    validate_report(doc)
    assert doc["schema_version"] == 1
    assert doc["model"]["name"] == "tuple_output_mlp (TupleOutputMLP)"
    assert doc["status"] == "healthy"


def test_sarif_to_stdout_is_the_only_thing_on_stdout() -> None:
    result = analyze(UNHEALTHY, "--sarif", "-", "--no-probe")
    assert result.exit_code == 1
    sarif = json.loads(result.stdout)
    assert sarif["version"] == "2.1.0"
    assert "GS101" in result.stdout


@pytest.mark.parametrize("args", [
    ["--json", "-", "--sarif", "-"],
    ["--json", "-", "--html", "-"],
])
def test_two_reports_cannot_share_stdout(args: list[str]) -> None:
    assert_usage_error(analyze(SMALL, *args), "stdout")


def test_report_files_are_written(tmp_path: Path) -> None:
    result = analyze(SMALL, "--json", "r.json", "--html", "out/r.html", "--sarif", "r.sarif")
    assert result.exit_code == 2, "the out/ folder does not exist yet"
    (tmp_path / "out").mkdir()
    result = analyze(SMALL, "--json", "r.json", "--html", "out/r.html", "--sarif", "r.sarif")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    validate_report(doc)
    assert doc["model"]["name"] == "tuple_output_mlp (TupleOutputMLP)"
    html = (tmp_path / "out" / "r.html").read_text()
    assert "<html" in html.lower() and "TupleOutputMLP" in html
    sarif = json.loads((tmp_path / "r.sarif").read_text())
    assert sarif["version"] == "2.1.0"
    for label, path in (("HTML", "out/r.html"), ("JSON", "r.json"), ("SARIF", "r.sarif")):
        assert f"{label} report: {path}" in result.stdout
    assert not [p.name for p in tmp_path.rglob("*.tmp")], "no temporary file left behind"


def test_two_targets_write_one_json_each(tmp_path: Path) -> None:
    result = analyze(SMALL, TWO_INPUTS, "--json", "out.json", "--no-probe")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "out.json").exists()
    first = json.loads((tmp_path / "out.tuple_output_mlp.json").read_text())
    second = json.loads((tmp_path / "out.two_input_model.json").read_text())
    assert first["model"]["name"] == "tuple_output_mlp (TupleOutputMLP)"
    assert second["model"]["name"] == "two_input_model (ImageVectorModel)"


def test_two_targets_exit_1_when_either_fails(tmp_path: Path) -> None:
    assert analyze(SMALL, UNHEALTHY, "--no-probe", "-q").exit_code == 1
    assert analyze(UNHEALTHY, SMALL, "--no-probe", "-q").exit_code == 1


BROKEN_FORWARD = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x.view(3, -1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


def build_model():
    return Net()


def example_inputs():
    return torch.randn(2, 8)
"""


def test_one_broken_target_does_not_stop_the_others(tmp_path: Path) -> None:
    """good, bad, good2: both good reports are written, the error line names bad.py, and
    the run exits 2 (a target could not be analysed)."""
    bad = write_model(tmp_path, "bad.py", BROKEN_FORWARD)
    result = analyze(SMALL, bad, TWO_INPUTS, "--json", "out.json", "--no-probe", "-q")
    assert result.exit_code == 2, result.stderr
    assert json.loads((tmp_path / "out.tuple_output_mlp.json").read_text())["status"]
    assert json.loads((tmp_path / "out.two_input_model.json").read_text())["status"]
    assert not (tmp_path / "out.bad.json").exists()
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors and all(str(bad) in line for line in errors), result.stderr
    assert "1 of 3 targets could not be analysed" in result.stderr


def test_an_error_in_forward_names_the_module_and_the_line(tmp_path: Path) -> None:
    bad = write_model(tmp_path, "bad.py", BROKEN_FORWARD)
    line = BROKEN_FORWARD.lstrip("\n").splitlines().index(
        "        return self.fc(x.view(3, -1))") + 1
    result = analyze(bad, "-q")
    assert result.exit_code == 2
    assert "in module `block`" in result.stderr and f"(bad.py:{line})" in result.stderr, \
        result.stderr


def test_targets_with_the_same_file_name_do_not_overwrite_each_other(tmp_path: Path) -> None:
    """Two NAMEs in one file, and two files called model.py: four targets, four reports."""
    write_model(tmp_path, "two.py", TWO_CLASSES)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_model(tmp_path / "a", "model.py", ONE_CLASS)
    write_model(tmp_path / "b", "model.py", ONE_CLASS.replace("Gamma", "Delta"))
    result = analyze("two.py:Alpha", "two.py:Beta", "a/model.py", "b/model.py",
                     "--json", "out.json", "--no-probe")
    assert result.exit_code == 0, result.stderr
    written = sorted(tmp_path.glob("out.*.json"))
    assert len(written) == 4, [p.name for p in written]
    names = sorted(json.loads(p.read_text())["model"]["name"] for p in written)
    assert names == ["Alpha", "Beta", "model (Delta)", "model (Gamma)"]


# ------------------------------------------------------------------ view and analyze --open


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs handed to webbrowser.open; no browser is started."""
    urls: list[str] = []

    def fake_open(url: str, *args: Any, **kwargs: Any) -> bool:
        urls.append(url)
        return True

    monkeypatch.setattr("webbrowser.open", fake_open)
    return urls


def test_view_opens_the_report_as_a_file_uri(tmp_path: Path, opened: list[str]) -> None:
    (tmp_path / "r.html").write_text("<html></html>", encoding="utf-8")
    result = invoke("view", "r.html")
    assert result.exit_code == 0, result.stderr
    assert opened == [(tmp_path / "r.html").resolve().as_uri()]
    assert opened[0].startswith("file://")


def test_view_without_a_browser_exits_2_with_the_path(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """webbrowser.open answers False when no browser can start (a server, CI): exit 2
    with the report's path and a hint, not 0 having shown nothing."""
    (tmp_path / "r.html").write_text("<html></html>", encoding="utf-8")
    monkeypatch.setattr("webbrowser.open", lambda url, *a, **k: False)
    result = invoke("view", "r.html")
    assert result.exit_code == 2
    line = assert_one_line_error(result.stderr, result.stdout, "no browser")
    assert str((tmp_path / "r.html").resolve()) in line and "BROWSER" in line


def test_view_missing_file_exits_2_with_one_line(opened: list[str]) -> None:
    assert_usage_error(invoke("view", "missing.html"), "missing.html")
    assert opened == []


def test_view_a_folder_exits_2(tmp_path: Path, opened: list[str]) -> None:
    (tmp_path / "folder.html").mkdir()
    assert_usage_error(invoke("view", "folder.html"), "folder.html")
    assert opened == []


def test_view_in_a_real_process_does_not_import_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys, webbrowser
        from click.testing import CliRunner
        from gradscope.cli import main

        urls = []
        webbrowser.open = lambda url, *a, **k: urls.append(url) or True
        open("r.html", "w").write("<html></html>")
        result = CliRunner().invoke(main, ["view", "r.html"])
        assert result.exit_code == 0, result.output
        assert len(urls) == 1 and urls[0].startswith("file://"), urls
        assert "torch" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_analyze_open_opens_the_html_report(tmp_path: Path, opened: list[str]) -> None:
    result = analyze(SMALL, "--no-probe", "--html", "r.html", "--open")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "r.html").is_file()
    assert opened == [(tmp_path / "r.html").resolve().as_uri()]


def test_analyze_open_with_two_targets_opens_each_report(tmp_path: Path,
                                                         opened: list[str]) -> None:
    result = analyze(SMALL, TWO_INPUTS, "--no-probe", "--html", "r.html", "--open", "-q")
    assert result.exit_code == 0, result.stderr
    assert opened == [(tmp_path / f"r.{stem}.html").resolve().as_uri()
                      for stem in ("tuple_output_mlp", "two_input_model")]


@pytest.mark.parametrize("html", [[], ["--html", "-"]])
def test_analyze_open_without_an_html_file_is_a_usage_error(html: list[str],
                                                            opened: list[str]) -> None:
    assert_usage_error(analyze(SMALL, "--no-probe", "--open", *html), "--open", "--html")
    assert opened == []


def test_json_to_stdout_with_two_targets_is_refused() -> None:
    assert_usage_error(analyze(SMALL, TWO_INPUTS, "--json", "-"), "--json")


def test_no_probe_report_has_no_measurements() -> None:
    doc = json_stdout(analyze(SMALL, "--json", "-", "--no-probe"))
    assert doc["probe"]["enabled"] is False
    assert doc["layers"], "static analysis still lists the layers"
    assert all(layer["probe_grad_rms"] is None for layer in doc["layers"])
    assert all(layer["param_grad_ratio"] is None for layer in doc["layers"])
    assert any(layer["static_grad_rms"] is not None for layer in doc["layers"])


def test_probe_report_has_measurements() -> None:
    doc = json_stdout(analyze(SMALL, "--json", "-", "--device", "cpu"))
    assert doc["probe"]["enabled"] is True
    assert doc["model"]["device"] == "cpu"
    assert any(layer["probe_grad_rms"] is not None for layer in doc["layers"])


def test_output_selects_a_dict_entry() -> None:
    default = json_stdout(analyze(TWO_INPUTS, "--json", "-", "--no-probe"))
    features = json_stdout(analyze(TWO_INPUTS, "--json", "-", "--no-probe",
                                   "--output", "features"))
    assert "logits" in default["model"]["output"]
    assert "features" in features["model"]["output"]
    assert default["model"]["output"] != features["model"]["output"]
    # the head comes after "features": no gradient reaches it from there
    head = {doc_name: {layer["module"]: layer for layer in doc["layers"]}["head"]
            for doc_name, doc in (("default", default), ("features", features))}
    assert head["default"]["static_grad_rms"] is not None
    assert head["features"]["static_grad_rms"] is None


def test_lr_turns_on_update_ratios() -> None:
    doc = json_stdout(analyze(SMALL, "--json", "-", "--lr", "0.01", "--optimizer", "adam"))
    assert doc["probe"]["lr"] == 0.01
    assert doc["probe"]["optimizer"] == "adam"
    assert any(layer.get("update_ratio") is not None for layer in doc["layers"])


def test_terminal_colour_only_when_asked() -> None:
    plain = analyze(UNHEALTHY, "--no-probe")
    assert ANSI not in plain.stdout, "CliRunner's stdout is not a TTY"
    coloured = analyze(UNHEALTHY, "--no-probe", "--color")
    assert ANSI in coloured.stdout, "--color must survive a pipe (CI logs)"
    assert ANSI not in analyze(UNHEALTHY, "--no-probe", "--no-color").stdout


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
def test_process_healthy_run_writes_reports_without_ansi(tmp_path: Path) -> None:
    proc = run_cli("analyze", HEALTHY, "--json", "r.json", "--html", "r.html",
                   "--sarif", "r.sarif", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ANSI not in proc.stdout and ANSI not in proc.stderr
    assert "HEALTHY" in proc.stdout
    assert "Traceback" not in proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    validate_report(doc)
    assert doc["status"] == "healthy"
    assert doc["probe"]["enabled"] is True
    assert (tmp_path / "r.html").stat().st_size > 0
    assert json.loads((tmp_path / "r.sarif").read_text())["version"] == "2.1.0"


@pytest.mark.slow
def test_process_unhealthy_exits_1_with_json_on_stdout(tmp_path: Path) -> None:
    proc = run_cli("analyze", UNHEALTHY, "--no-probe", "--json", "-", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "unhealthy"
    assert {f["rule"] for f in doc["findings"]} >= {"GS101"}


@pytest.mark.slow
def test_process_error_is_one_line_and_debug_adds_the_traceback(tmp_path: Path) -> None:
    write_model(tmp_path, "model.py", ERROR_CASES["syntax_error"][0] or "")
    proc = run_cli("analyze", "model.py", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, proc.stdout, "syntax error", "model.py:3")
    proc = run_cli("analyze", "model.py", "--debug", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("gradscope: error: syntax error")


@pytest.mark.slow
def test_process_missing_file_exits_2(tmp_path: Path) -> None:
    proc = run_cli("analyze", "does_not_exist.py", "--no-probe", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, proc.stdout, "does_not_exist.py")


def test_readme_rule_table_is_the_registry() -> None:
    """The README's rule table is generated from the registry (GRADSCOPE_UPDATE_GOLDEN=1)."""
    path = REPO / "README.md"
    text = path.read_text(encoding="utf-8")
    generated = replace_table(text)
    if os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1":
        path.write_text(generated, encoding="utf-8")
    assert text == generated, "README rule table is stale: GRADSCOPE_UPDATE_GOLDEN=1 pytest"
    rows = [line for line in text.splitlines() if line.startswith("| GS")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == sorted(RULES)


def test_rules_markdown_matches_readme_block() -> None:
    result = CliRunner().invoke(main, ["rules", "--format", "markdown"])
    assert result.exit_code == 0
    assert result.output == markdown_table()
    assert TABLE_START in (REPO / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------ fast start-up path


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["-V"]])
def test_fast_entry_answers_like_click(args: list[str], capsys: pytest.CaptureFixture[str],
                                       ) -> None:
    """gradscope._entry serves --help/--version without click; the text must be click's.

    GRADSCOPE_UPDATE_GOLDEN=1 regenerates gradscope/cli_help.txt after a change of
    the CLI's options.
    """
    from gradscope import _entry

    expected = CliRunner().invoke(main, args, prog_name="gradscope", terminal_width=80)
    assert expected.exit_code == 0
    if args[0] in ("--help", "-h") and os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1":
        Path(_entry.HELP_FILE).write_text(expected.output, encoding="utf-8")
    assert _entry.main(args) == 0
    assert capsys.readouterr().out == expected.output, \
        "gradscope/cli_help.txt is stale: GRADSCOPE_UPDATE_GOLDEN=1 pytest tests/test_cli.py"


def test_fast_entry_passes_everything_else_to_click(capsys: pytest.CaptureFixture[str]) -> None:
    from gradscope import _entry

    with pytest.raises(SystemExit) as exit_info:
        _entry.main(["rules", "--format", "markdown"])
    assert exit_info.value.code in (0, None)
    assert "| GS101 |" in capsys.readouterr().out


def test_console_script_help_imports_no_click() -> None:
    code = ("import sys; sys.argv = ['gradscope', '--help']; from gradscope._entry import main; "
            "main(); assert 'click' not in sys.modules and 'torch' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('click', 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: gradscope")
