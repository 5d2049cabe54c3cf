"""Baselines and diffs: CI fails on what is new, not on what a team already knows about.

The end-to-end cases run the real CLI on the sample models (reports written
once per module, in-process through click's CliRunner); the identity and
matching rules are unit-tested on small hand-written report documents.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from helpers import SAMPLE_DIR, cli_runner

from gradscope.baseline import (
    diff,
    finding_key,
    load_report,
    new_findings,
    render_diff,
)
from gradscope.cli import main
from gradscope.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
UNHEALTHY = SAMPLE_DIR / "deep_sigmoid_mlp.py"
HEALTHY = SAMPLE_DIR / "relu_mlp_kaiming.py"
EXPLODING = SAMPLE_DIR / "large_init_mlp.py"


def invoke(*args: Any) -> Result:
    return cli_runner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradscope: error: "), lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose nearest pyproject.toml has no [tool.gradscope]."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "user-project"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """JSON reports of three sample models (and a second run of the unhealthy one)."""
    folder = tmp_path_factory.mktemp("reports")
    (folder / "pyproject.toml").write_text('[project]\nname = "user-project"\n')
    out: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for key, model in (("unhealthy", UNHEALTHY), ("unhealthy_again", UNHEALTHY),
                           ("healthy", HEALTHY), ("exploding", EXPLODING)):
            path = folder / f"{key}.json"
            result = invoke("analyze", model, "--device", "cpu", "--json", path, "-q",
                            "--fail-on", "never")
            assert result.exit_code == 0, result.stderr
            out[key] = path
        yield out


# ------------------------------------------------------------------ analyze --baseline


def test_unhealthy_model_against_its_own_baseline_exits_0(reports: dict[str, Path]) -> None:
    result = invoke("analyze", UNHEALTHY, "--device", "cpu", "--no-color",
                    "--baseline", reports["unhealthy"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    # Still shown in full: the baseline changes the exit code, not what is reported.
    assert "unhealthy" in result.stdout
    assert "GS101" in result.stdout
    flat = " ".join(result.stdout.split())  # the terminal wraps to 80 columns
    assert f"baseline {reports['unhealthy']}: 5 findings known, 0 new" in flat


def test_json_report_keeps_every_finding_and_notes_the_baseline(
        reports: dict[str, Path]) -> None:
    result = invoke("analyze", UNHEALTHY, "--device", "cpu", "--json", "-",
                    "--baseline", reports["unhealthy"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    baseline = json.loads(reports["unhealthy"].read_text())
    assert doc["status"] == "unhealthy"
    assert [f["rule"] for f in doc["findings"]] == [f["rule"] for f in baseline["findings"]]
    assert any(n.startswith("baseline ") and "0 new" in n for n in doc["notes"])


def test_healthy_baseline_against_unhealthy_model_exits_1(reports: dict[str, Path]) -> None:
    result = invoke("analyze", UNHEALTHY, "--device", "cpu", "--no-color",
                    "--baseline", reports["healthy"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    # relu_mlp_kaiming's GS701 (plain depth, same module "0") is known; the rest is new.
    assert "1 finding known, 4 new (GS101, GS102, GS104, GS705)" in " ".join(
        result.stdout.split())  # the terminal wraps to 80 columns


def test_baseline_and_fail_on_combine(reports: dict[str, Path]) -> None:
    """Against the healthy baseline only warnings are new once errors are ignored."""
    result = invoke("analyze", UNHEALTHY, "--device", "cpu", "-q", "--ignore", "GS101,GS102",
                    "--baseline", reports["healthy"], "--fail-on", "warning")
    assert result.exit_code == 1
    result = invoke("analyze", UNHEALTHY, "--device", "cpu", "-q", "--ignore", "GS101,GS102",
                    "--baseline", reports["healthy"])  # fail-on error: warnings do not fail
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("content, fragments", [
    ("{not json", ["baseline", "not valid JSON"]),
    ('{"schema_version": 99, "findings": []}', ["schema_version 99"]),
    ("[1, 2]", ["not a gradscope JSON report"]),
    ('{"schema_version": 1, "findings": [{"rule": 3}]}', ["findings[0]"]),
])
def test_corrupt_baseline_exits_2_with_one_line(tmp_path: Path, content: str,
                                                fragments: list[str]) -> None:
    (tmp_path / "old.json").write_text(content)
    assert_one_line_error(invoke("analyze", UNHEALTHY, "--device", "cpu",
                                 "--baseline", "old.json"), "old.json", *fragments)


def test_missing_baseline_exits_2_before_analysing(tmp_path: Path) -> None:
    # The target does not exist either: the baseline is read first, so it is the one named.
    assert_one_line_error(invoke("analyze", "no_model.py", "--baseline", "nope.json"),
                          "baseline nope.json", "does not exist")


# ------------------------------------------------------------------ gradscope diff


def test_diff_healthy_to_exploding_shows_added_findings_and_moved_layers(
        reports: dict[str, Path]) -> None:
    result = invoke("diff", reports["healthy"], reports["exploding"])
    assert result.exit_code == 1, result.stdout
    out = result.stdout
    assert "status: healthy -> unhealthy" in out
    assert "added findings (2):" in out
    assert "+ GS201 error at 0:" in out and "+ GS202 error at 0:" in out
    assert "layers whose gradient RMS moved more than 2x" in out
    # before -> after with the factor, for the first Linear layer
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("_0 (0, Linear):"))
    assert "probe 0.9" in line and "-> 4.8" in line and "(x5." in line, line
    assert "removed findings" not in out


def test_diff_fail_on_new(reports: dict[str, Path]) -> None:
    assert invoke("diff", reports["healthy"], reports["exploding"],
                  "--fail-on-new", "never").exit_code == 0
    # The other way round only removes findings: nothing new, exit 0.
    back = invoke("diff", reports["exploding"], reports["healthy"])
    assert back.exit_code == 0, back.stdout
    assert "removed findings (2):" in back.stdout
    assert "status: unhealthy -> healthy" in back.stdout
    # deep_sigmoid vs healthy: the new findings include warnings.
    assert invoke("diff", reports["healthy"], reports["unhealthy"],
                  "--fail-on-new", "warning").exit_code == 1


def test_same_model_analysed_twice_has_no_diff(reports: dict[str, Path]) -> None:
    old, new = load_report(reports["unhealthy"]), load_report(reports["unhealthy_again"])
    result = diff(old, new)
    assert result.empty, result.to_dict()
    assert new_findings(old, new["findings"]) == []
    cli = invoke("diff", reports["unhealthy"], reports["unhealthy_again"], "--fail-on-new",
                 "info")
    assert cli.exit_code == 0
    assert "no changes" in cli.stdout


@pytest.mark.parametrize("which", ["old", "new"])
def test_diff_unreadable_report_exits_2(tmp_path: Path, reports: dict[str, Path],
                                        which: str) -> None:
    (tmp_path / "bad.json").write_text("{")
    args = ("bad.json", reports["healthy"]) if which == "old" else (reports["healthy"],
                                                                    "bad.json")
    assert_one_line_error(invoke("diff", *args), "bad.json")
    assert_one_line_error(invoke("diff", reports["healthy"], "missing.json"), "missing.json")


def test_diff_runs_without_importing_torch(tmp_path: Path, reports: dict[str, Path]) -> None:
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from gradscope.cli import main

        result = CliRunner().invoke(main, ["diff", {str(reports['healthy'])!r},
                                           {str(reports['exploding'])!r}])
        assert result.exit_code == 1, result.output
        assert "GS201" in result.output
        leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not leaked, leaked[:5]
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ------------------------------------------------------------------ identity and matching


def _finding(rule: str = "GS101", severity: str = "error", module: str | None = "enc.0",
             file: str | None = "/home/a/proj/model.py", line: int | None = 12,
             message: str = "ratio 1.2e-05") -> dict[str, Any]:
    return {"rule": rule, "category": "vanishing_gradient", "severity": severity,
            "message": message, "recommendations": [], "evidence": {},
            "location": {"module": module, "node": "enc_0", "file": file, "line": line}}


def _doc(findings: list[dict[str, Any]], layers: list[dict[str, Any]] | None = None,
         status: str = "unhealthy") -> dict[str, Any]:
    return {"schema_version": 1, "status": status, "findings": findings,
            "layers": layers or []}


def test_identity_ignores_message_line_and_directory() -> None:
    a = _finding()
    b = _finding(message="ratio 3.4e-06", line=40, file="C:\\ci\\checkout\\model.py")
    assert finding_key(a) == finding_key(b) == ("GS101", "enc.0", "model.py")
    assert finding_key(_finding(module=None)) == ("GS101", "enc_0", "model.py")
    assert finding_key(_finding(rule="GS102")) != finding_key(a)
    assert finding_key(_finding(module="enc.1")) != finding_key(a)


def test_worse_severity_and_extra_copies_are_new() -> None:
    base = _doc([_finding(severity="warning")])
    assert new_findings(base, [_finding(severity="warning")]) == []
    assert new_findings(base, [_finding(severity="info")]) == []  # milder: still known
    worse = _finding(severity="error")
    assert new_findings(base, [worse]) == [worse]
    # One known finding covers one current finding, not two.
    second = _finding(severity="warning", message="another")
    assert new_findings(base, [_finding(severity="warning"), second]) == [second]


def test_diff_reports_severity_changes_not_added_and_removed() -> None:
    old = _doc([_finding(severity="warning")], status="warning")
    new = _doc([_finding(severity="error")])
    result = diff(old, new)
    assert result.added == [] and result.removed == []
    assert [(c.before["severity"], c.after["severity"]) for c in result.severity_changed] == [
        ("warning", "error")]
    assert result.fails("error")  # a finding that got worse fails like a new one
    assert "warning -> error" in render_diff(result)
    better = diff(new, old)
    assert not better.fails("info")
    assert "status: unhealthy -> warning" in render_diff(better)


def _layer(name: str, module: str | None, op: str, probe: float | None,
           static: float | None = None) -> dict[str, Any]:
    return {"name": name, "module": module, "op": op, "probe_grad_rms": probe,
            "static_grad_rms": static}


def test_layers_match_by_name_then_module_and_op() -> None:
    old = [_layer("input_1", None, "input", 1.0), _layer("fc1", "fc1", "Linear", 1.0),
           _layer("relu", "act", "ReLU", 1.0), _layer("fc2", "fc2", "Linear", 1.0)]
    # A layer inserted: fx renames relu -> relu_1, which module+op still pairs.
    new = [_layer("input_1", None, "input", 1.0), _layer("fc1", "fc1", "Linear", 1.9),
           _layer("norm", "norm", "LayerNorm", 1.0), _layer("relu_1", "act", "ReLU", 5.0),
           _layer("fc2", "fc2", "Linear", 0.4)]
    result = diff(_doc([], old), _doc([], new))
    assert result.layers_added == 1 and result.layers_removed == 0
    moved = {(c.name, c.metric): (c.before, c.after) for c in result.layer_changes}
    # 1.9x is under the 2x factor; 5x and 1/2.5 are over it.
    assert moved == {("relu_1", "probe_grad_rms"): (1.0, 5.0),
                     ("fc2", "probe_grad_rms"): (1.0, 0.4)}
    assert [c.name for c in diff(_doc([], old), _doc([], new), factor=10).layer_changes] == []
    text = render_diff(result)
    assert "relu_1 (act, ReLU): probe 1 -> 5 (x5)" in text
    assert "layers: 1 added, 0 removed" in text


def test_layer_that_lost_its_gradient_is_listed() -> None:
    old = _doc([], [_layer("fc", "fc", "Linear", 0.5, 0.5)])
    new = _doc([], [_layer("fc", "fc", "Linear", 0.0, None)])
    (change,) = diff(old, new).layer_changes
    assert (change.metric, change.before, change.after) == ("probe_grad_rms", 0.5, 0.0)


def test_load_report_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_report(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="is a directory"):
        load_report(tmp_path)
    good = tmp_path / "good.json"
    doc = _doc([_finding()])
    good.write_text(json.dumps(doc))
    assert load_report(good) == doc
    bad = copy.deepcopy(doc)
    bad["findings"][0]["severity"] = "fatal"
    good.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"findings\[0\]"):
        load_report(good)
