"""``gradscope.testing.assert_healthy_gradients``: the pytest helper and its example.

The example file users copy is run by a real pytest process, so what the
README points to is known to pass; the message and ``fail_on`` semantics are
checked directly on small inline models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradscope
from gradscope.testing import assert_healthy_gradients

REPO = Path(__file__).resolve().parents[1]


def _x(width: int = 32) -> torch.Tensor:
    return torch.randn(8, width, generator=torch.Generator().manual_seed(0))


class DeepSigmoid(nn.Module):
    """Defined in this file so findings point at a source line here."""

    def __init__(self, depth: int = 10, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


def _kaiming_mlp(depth: int, width: int = 32) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


class Cumulative(nn.Module):
    """Healthy but for ops the estimator does not model: GS802 (a warning) only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).cumsum(-1).cummax(-1).values)


@pytest.mark.slow
def test_example_file_passes_under_a_real_pytest() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "examples/test_model_gradients.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_a_failing_test_shows_its_line_and_the_diagnosis_not_gradscopes_source(
        tmp_path: Path) -> None:
    """pytest printed ~40 lines of the helper's own source before its message."""
    (tmp_path / "test_deep.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from gradscope.testing import assert_healthy_gradients

        def test_deep_sigmoid():
            torch.manual_seed(0)
            layers = []
            for _ in range(20):
                layers += [nn.Linear(16, 16), nn.Sigmoid()]
            assert_healthy_gradients(nn.Sequential(*layers), torch.randn(8, 16))
    """), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_deep.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gradscope: " in proc.stdout and "GS101" in proc.stdout, proc.stdout
    assert "assert_healthy_gradients(nn.Sequential(*layers)" in proc.stdout  # the user's line
    for ours in ("_check_fail_on(fail_on)", "failing.sort(", "def assert_healthy_gradients"):
        assert ours not in proc.stdout, ours


def test_message_lists_codes_locations_and_fixes() -> None:
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as failure:
        assert_healthy_gradients(DeepSigmoid(), _x())
    message = str(failure.value)
    lines = message.splitlines()
    assert lines[0].startswith("gradscope: 2 finding(s) at or above 'error' in DeepSigmoid "
                               "(status unhealthy)"), lines[0]
    finding_lines = [ln for ln in lines if ln.startswith("  GS")]
    assert [ln.split()[:2] for ln in finding_lines] == [["GS101", "error"], ["GS102", "error"]]
    # file:line (module): the source line of this test file that calls the first layer
    assert all("test_testing_helper.py:" in ln and "(layers.0)" in ln for ln in finding_lines)
    assert "Vanishing gradient" in finding_lines[0]
    assert "    fix: " in message
    # The fix's code is indented under its text, and shared code is printed once.
    assert "\n        import torch.nn as nn\n" in message
    assert "\n                nn.init.kaiming_normal_(m.weight" in message
    assert "(code as above)" in message
    # Warnings (GS104, GS705 ...) do not fail at fail_on="error": counted, not listed.
    assert "milder finding(s) below 'error' not listed" in message
    assert "GS705" not in message


def test_fail_on_semantics() -> None:
    torch.manual_seed(0)
    warning_only = Cumulative()
    report = assert_healthy_gradients(warning_only, torch.randn(8, 16))
    assert report.status == "warning"  # warnings pass at the default fail_on="error"
    with pytest.raises(AssertionError, match="GS802 warning"):
        assert_healthy_gradients(warning_only, torch.randn(8, 16), fail_on="warning")

    deep_plain = _kaiming_mlp(depth=12)  # healthy, but GS701 (info: no skip connection)
    assert assert_healthy_gradients(deep_plain, _x(), fail_on="warning").status == "healthy"
    with pytest.raises(AssertionError, match="GS701 info"):
        assert_healthy_gradients(deep_plain, _x(), fail_on="info")

    unhealthy = assert_healthy_gradients(DeepSigmoid(), _x(), fail_on="never")
    assert unhealthy.status == "unhealthy"


@pytest.mark.parametrize("bad", ["errors", "ERROR", "", "fatal"])
def test_bad_fail_on_is_a_value_error_before_anything_runs(bad: str) -> None:
    with pytest.raises(ValueError, match="fail_on must be one of"):
        assert_healthy_gradients(object(), None, fail_on=bad)


def test_analyze_options_are_passed_through() -> None:
    torch.manual_seed(0)
    # The only errors are GS1xx: ignoring them leaves nothing at or above "error".
    report = assert_healthy_gradients(DeepSigmoid(), _x(), ignore=["GS1"], probe=False)
    assert report.probe.enabled is False
    assert all(not f.rule.startswith("GS1") for f in report.findings)


def test_exported_lazily_without_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        import gradscope
        import gradscope.testing
        assert gradscope.assert_healthy_gradients is gradscope.testing.assert_healthy_gradients
        assert "assert_healthy_gradients" in gradscope.__all__
        leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not leaked, leaked[:5]
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert gradscope.assert_healthy_gradients is assert_healthy_gradients
