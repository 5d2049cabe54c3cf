"""Faults and resource limits (issue 8): every fault ends in a report or one clear line.

Each case checks the outcome a user or CI job sees (a report with the right
finding or note, or a ``GradscopeError`` / exit 2 with one line and no
traceback) and that the model is left as it was found (``Snapshot`` from
test_state.py: values bit for bit incl. BatchNorm statistics and
``num_batches_tracked``, grads, requires_grad, train flags, hooks, RNG).

Not repeated here (see test_state.py / test_cli.py): the forward raising or
KeyboardInterrupt in the first probe batch through ``analyze``, ``--device
cuda`` / ``cuda:7`` / ``tpu`` through the CLI, unwritable paths found before the
analysis, and Ctrl-C in ``analyze`` giving exit 130.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from helpers import cli_runner
from test_state import Snapshot, _prepare
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import gradscope
import gradscope.api
import gradscope.probe
import gradscope.render
import gradscope.resources
from gradscope._io import atomic_write_text
from gradscope.cli import main
from gradscope.config import load_settings
from gradscope.errors import (
    ConfigError,
    DeviceError,
    InputError,
    ModelRunError,
    OutputError,
    ResourceError,
)
from gradscope.resources import Footprint, footprint

# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose nearest pyproject.toml has no [tool.gradscope]."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "user-project"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def analyze_cli(*args: Any) -> Result:
    return cli_runner().invoke(main, ["analyze", *[str(a) for a in args]],
                               catch_exceptions=False)


def one_error_line(result: Result, *fragments: str) -> str:
    """Exit 2, exactly one stderr line ``gradscope: error: ...``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradscope: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_model(folder: Path, source: str, name: str = "model.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    return path


def no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 4))


def prepared(model: nn.Module) -> Snapshot:
    """Non-default state everywhere (grads, frozen weight, eval submodules, hooks), then a
    snapshot taken under an RNG state gradscope did not set."""
    _prepare(model)
    torch.manual_seed(4321)
    return Snapshot(model)


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))

# ------------------------------------------------------------------ the forward raises midway


class FailsOnBatch(nn.Module):
    """Raises inside forward on probe batch ``n`` (1-based), after BatchNorm has run."""

    def __init__(self, n: int, error: type[BaseException] = RuntimeError) -> None:
        super().__init__()
        self.body = bn_mlp()
        self.n = n
        self.error = error
        self.calls = 0
        self.body[1].register_forward_hook(self._count)

    def _count(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad and not isinstance(out, FakeTensor):
            self.calls += 1
            if self.calls == self.n:
                raise self.error(f"boom on probe batch {self.n}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_forward_raising_on_the_second_batch_restores_the_model(
        error: type[BaseException]) -> None:
    """The first batch has already moved BN statistics and the RNG when the second fails."""
    model = FailsOnBatch(2, error)
    snap = prepared(model)
    expected: type[BaseException] = ModelRunError if error is RuntimeError else error
    with pytest.raises(expected) as info:
        gradscope.analyze(model, X, device="cpu", batches=3)
    assert model.calls == 2, "the first batch ran"
    if error is RuntimeError:
        assert "boom on probe batch 2" in str(info.value)
        assert "--no-probe" in info.value.one_line()  # type: ignore[attr-defined]
    snap.assert_unchanged()


RAISES_MIDWAY = """
import torch
from torch import nn

class Midway(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if h.requires_grad and not isinstance(h, torch._subclasses.fake_tensor.FakeTensor):
            raise RuntimeError("midway failure in forward")
        return self.b(h)

def example_inputs():
    return torch.randn(4, 8)
"""


def test_forward_raising_midway_via_the_cli_is_one_line(tmp_path: Path) -> None:
    model = write_model(tmp_path, RAISES_MIDWAY)
    result = analyze_cli(model, "--tracer", "runtime")
    one_error_line(result, "midway failure in forward", "during the probe")
    debug = analyze_cli(model, "--tracer", "runtime", "--debug")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("gradscope: error: ")


# ------------------------------------------------------------------ NaN / Inf


class NonFinite(nn.Module):
    """NaN or Inf produced in the forward (GS501), or only in the backward (GS502)."""

    def __init__(self, where: str, value: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 2)
        self.where = where
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.a(x))
        if self.where == "forward":
            h = h + self.value  # every later activation is non-finite
        else:
            # Finite forward (0 * x), non-finite derivative: d/dh sqrt(0 * h) at 0 is inf,
            # times 0 is NaN; Inf from the power's derivative at 0.
            h = torch.sqrt(h * 0.0) if math.isnan(self.value) else (h * 0.0) ** 0.5 + h
        return self.b(h)  # type: ignore[no-any-return]


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where,rule", [("forward", "GS501"), ("backward", "GS502")])
def test_nonfinite_values_become_a_finding(where: str, rule: str, value: float) -> None:
    model = NonFinite(where, value)
    snap = prepared(model)
    report = gradscope.analyze(model, X, device="cpu")
    assert rule in {f.rule for f in report.findings}, [f.rule for f in report.findings]
    assert report.status == "unhealthy"
    json.dumps(report.to_dict(), allow_nan=False)  # null plus a note, never bare NaN
    snap.assert_unchanged()


# ------------------------------------------------------------------ nothing differentiable


class DiscreteOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y.argmax(-1) if self.kind == "int" else y > 0


@pytest.mark.parametrize("kind", ["int", "bool"])
def test_integer_or_boolean_output_is_a_clear_error(kind: str, tmp_path: Path) -> None:
    model = DiscreteOutput(kind)
    snap = prepared(model)
    with pytest.raises(OutputError) as info:
        gradscope.analyze(model, X, device="cpu")
    line = info.value.one_line()
    assert "no floating-point tensor to differentiate" in line and "--output" in line
    snap.assert_unchanged()
    source = f"""
        import torch
        from torch import nn

        class Discrete(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                y = self.fc(x)
                return {"y.argmax(-1)" if kind == "int" else "y > 0"}

        def example_inputs():
            return torch.randn(4, 8)
    """
    one_error_line(analyze_cli(write_model(tmp_path, source)), "floating-point")


@pytest.mark.parametrize("case", ["frozen", "parameter_free"])
def test_model_without_trainable_parameters_gives_a_report(case: str) -> None:
    if case == "frozen":
        model = bn_mlp()
        model.requires_grad_(False)
    else:
        model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Softmax(-1))
    snap = Snapshot(model)
    report = gradscope.analyze(model, X, device="cpu")
    assert report.model.num_trainable_parameters == 0
    assert any("no trainable parameter" in n for n in report.notes), report.notes
    json.dumps(report.to_dict(), allow_nan=False)
    snap.assert_unchanged()


# ------------------------------------------------------------------ BatchNorm with a batch of one

BN_MODEL = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
"""


def test_batchnorm_batch_of_one_in_train_mode_is_a_clear_error_with_a_way_out() -> None:
    """Decision: an error, not a silent fallback to eval mode, which would measure a
    different network (running statistics instead of batch statistics). The hint
    names both ways out, and the second one (--probe-mode eval) works."""
    model = bn_mlp()
    one = torch.randn(1, 8)
    snap = prepared(model)
    with pytest.raises(InputError) as info:
        gradscope.analyze(model, one, device="cpu")
    line = info.value.one_line()
    assert "Expected more than 1 value per channel" in line
    assert "--probe-mode eval" in line and "--input-shape" in line
    snap.assert_unchanged()
    report = gradscope.analyze(model, one, device="cpu", probe_mode="eval")
    assert report.probe.enabled and report.probe.mode == "eval"
    snap.assert_unchanged()


@pytest.mark.parametrize("tracer", ["symbolic_trace", "export", "runtime"])
def test_batchnorm_batch_of_one_gets_the_hint_whatever_the_tracer(tracer: str) -> None:
    """torch.export wraps the model's error in its own: still the input's fault, same hint."""
    model = bn_mlp()
    one = torch.randn(1, 8)
    snap = prepared(model)
    with pytest.raises(InputError) as info:
        gradscope.analyze(model, one, device="cpu", tracer=tracer)
    assert "--probe-mode eval" in info.value.one_line()
    snap.assert_unchanged()


def test_batchnorm_batch_of_one_via_the_cli(tmp_path: Path) -> None:
    model = write_model(tmp_path, BN_MODEL)
    one_error_line(analyze_cli(model, "--input-shape", "1,8"), "--probe-mode eval",
                   "batch of 2 or more")
    result = analyze_cli(model, "--input-shape", "1,8", "--probe-mode", "eval")
    assert result.exit_code in (0, 1), result.stderr


# ------------------------------------------------------------------ devices not present


def _absent(device: str) -> bool:
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return not torch.cuda.is_available() or index >= torch.cuda.device_count()
    mps = getattr(torch.backends, "mps", None)
    return mps is None or not mps.is_available()


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_absent_device_is_a_device_error(device: str, tmp_path: Path) -> None:
    if not _absent(device):
        pytest.skip(f"{device} exists on this machine")
    model = bn_mlp()
    snap = prepared(model)
    with pytest.raises(DeviceError) as info:
        gradscope.analyze(model, X, device=device)
    assert device in info.value.one_line() and "--device cpu" in info.value.one_line()
    snap.assert_unchanged()
    one_error_line(analyze_cli(write_model(tmp_path, BN_MODEL), "--input-shape", "4,8",
                               "--device", device), device)


# ------------------------------------------------------------------ unwritable output, full disk


def _report() -> gradscope.Report:
    return gradscope.analyze(bn_mlp(), X, device="cpu", probe=False)


@pytest.mark.parametrize("writer", ["write_html", "write_json", "write_sarif"])
def test_report_path_under_a_regular_file_is_an_output_error(writer: str,
                                                             tmp_path: Path) -> None:
    """Not a permission test (root ignores permissions): a path below a regular file
    cannot be written by anyone."""
    (tmp_path / "file.txt").write_text("a regular file")
    with pytest.raises(OutputError) as info:
        getattr(gradscope.render, writer)(_report(), tmp_path / "file.txt" / "report.out")
    assert "cannot write" in info.value.one_line()
    assert (tmp_path / "file.txt").read_text() == "a regular file"
    assert no_temp_files(tmp_path) == []


_REAL_FDOPEN = os.fdopen


class _FullDisk:
    """A file object whose writes fail as on a full disk, after the temp file exists."""

    def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:
        self._file = _REAL_FDOPEN(fd, *args, **kwargs)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def write(self, text: str) -> int:
        self._file.write(text[: len(text) // 2])  # half of it made it to the disk
        self._file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_keeps_the_previous_report(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    target.write_text('{"previous": true}')
    report = _report()
    monkeypatch.setattr("gradscope._io.os.fdopen", _FullDisk)
    with pytest.raises(OutputError) as info:
        gradscope.render.write_json(report, target)
    assert "No space left on device" in info.value.one_line()
    assert target.read_text() == '{"previous": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml", "report.json"]


def test_full_disk_via_the_cli_is_one_line_and_keeps_the_old_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path, BN_MODEL)
    (tmp_path / "r.json").write_text("old json")
    (tmp_path / "r.html").write_text("old html")
    monkeypatch.setattr("gradscope._io.os.fdopen", _FullDisk)
    result = analyze_cli(model, "--input-shape", "4,8", "--json", tmp_path / "r.json",
                         "--html", tmp_path / "r.html")
    one_error_line(result, "cannot write", "No space left on device")
    assert (tmp_path / "r.json").read_text() == "old json"
    assert (tmp_path / "r.html").read_text() == "old html"
    assert no_temp_files(tmp_path) == []


# ------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("error", [OSError(errno.EIO, "I/O error"), KeyboardInterrupt()])
def test_exception_mid_write_leaves_the_old_file_and_no_temp(
        error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    seen: list[str] = []

    def failing_fsync(fd: int) -> None:
        seen.extend(p.name for p in tmp_path.glob("*.tmp"))  # the temp file exists now
        raise error

    monkeypatch.setattr("gradscope._io.os.fsync", failing_fsync)
    expected = OutputError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        atomic_write_text(target, "new " * 1000)
    assert len(seen) == 1 and seen[0].startswith(".r.json."), seen
    assert target.read_text() == "old"
    assert no_temp_files(tmp_path) == []


def test_atomic_write_renames_a_synced_sibling(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """temp file in the target's directory (os.replace is atomic only within one
    filesystem), fsync'ed before the rename."""
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", fd))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", (Path(src), Path(dst))))
        real_replace(src, dst)

    monkeypatch.setattr("gradscope._io.os.fsync", fsync)
    monkeypatch.setattr("gradscope._io.os.replace", replace)
    atomic_write_text(tmp_path / "r.html", "<html></html>")
    kinds = [kind for kind, _ in events]
    assert kinds.index("fsync") < kinds.index("replace")
    src, dst = next(arg for kind, arg in events if kind == "replace")
    assert src.parent == dst.parent == tmp_path
    assert (tmp_path / "r.html").read_text() == "<html></html>"


# ------------------------------------------------------------------ Ctrl-C during the probe


def _interrupt_second_batch(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = gradscope.probe._run_batch

    def run_batch(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gradscope.probe, "_run_batch", run_batch)
    return calls


def test_keyboard_interrupt_in_the_second_batch_propagates_and_restores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _interrupt_second_batch(monkeypatch)
    model = bn_mlp()
    snap = prepared(model)
    with pytest.raises(KeyboardInterrupt):
        gradscope.analyze(model, X, device="cpu", batches=3)
    assert len(calls) == 2
    snap.assert_unchanged()


def test_keyboard_interrupt_via_the_cli_exits_130_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _interrupt_second_batch(monkeypatch)
    models: list[tuple[nn.Module, Snapshot]] = []
    real = gradscope.api.analyze

    def analyze(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        models.append((model, Snapshot(model)))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(gradscope.api, "analyze", analyze)
    (tmp_path / "r.json").write_text("previous report")
    result = analyze_cli(write_model(tmp_path, BN_MODEL), "--input-shape", "4,8",
                         "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert result.exit_code == 130, result.stderr
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert len(calls) == 2
    assert (tmp_path / "r.json").read_text() == "previous report"
    assert not (tmp_path / "r.html").exists()
    assert no_temp_files(tmp_path) == []
    (_, snap), = models
    snap.assert_unchanged()


# ------------------------------------------------------------------ --timeout


class Sleepy(nn.Module):
    """Sleeps (or advances a fake clock) in every probe forward, never while tracing."""

    def __init__(self, seconds: float, clock: list[float] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.b = nn.Linear(16, 2)
        self.seconds = seconds
        self.clock = clock
        self.a.register_forward_hook(self._wait)

    def _wait(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad and not isinstance(out, FakeTensor):
            if self.clock is None:
                time.sleep(self.seconds)
            else:
                self.clock[0] += self.seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))  # type: ignore[no-any-return]


def test_timeout_keeps_the_batches_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock makes the count exact: 10 s per probe forward, a 15 s budget."""
    clock = [1000.0]

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

    monkeypatch.setattr(gradscope.resources, "time", FakeTime)
    model = Sleepy(10.0, clock)
    snap = prepared(model)
    report = gradscope.analyze(model, X, device="cpu", batches=5, timeout=15)
    assert report.probe.enabled and report.probe.batches == 1
    assert "probe stopped after 1 of 5 batches: --timeout 15 s" in report.notes
    assert any(layer.probe_grad_rms is not None for layer in report.layers)
    snap.assert_unchanged()


def test_timeout_with_a_sleeping_forward_stops_in_time() -> None:
    model = Sleepy(0.4)
    snap = prepared(model)
    start = time.monotonic()
    report = gradscope.analyze(model, X, device="cpu", batches=100, timeout=1.5)
    elapsed = time.monotonic() - start
    assert elapsed < 1.5 + 0.4 + 3.0, elapsed  # one sleep past the deadline, plus slack
    assert any(n.startswith("probe stopped after ") and "--timeout 1.5 s" in n
               for n in report.notes), report.notes
    if report.probe.enabled:  # else: tracing took the whole budget on a slow machine
        assert 1 <= report.probe.batches < 100
    snap.assert_unchanged()


def test_timeout_before_one_batch_gives_the_static_estimate() -> None:
    """The CI-friendly choice: a report with the static estimate and a note, not an error."""
    model = Sleepy(1.0)
    snap = prepared(model)
    report = gradscope.analyze(model, X, device="cpu", timeout=0.5)
    assert not report.probe.enabled
    assert "probe stopped after 0 of 3 batches: --timeout 0.5 s; the report has the " \
        "static estimate only" in report.notes
    assert all(layer.probe_grad_rms is None for layer in report.layers)
    assert any(layer.static_grad_rms is not None for layer in report.layers)
    snap.assert_unchanged()


SLEEPY_FILE = """
import time
import torch
from torch import nn

class Sleepy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if h.requires_grad and not isinstance(h, torch._subclasses.fake_tensor.FakeTensor):
            time.sleep(1.0)
        return self.b(h)

def example_inputs():
    return torch.randn(4, 8)
"""


@pytest.mark.parametrize("source", ["option", "pyproject"])
def test_timeout_via_the_cli_and_pyproject(source: str, tmp_path: Path) -> None:
    model = write_model(tmp_path, SLEEPY_FILE)
    args: list[Any] = [model, "--tracer", "runtime", "--json", tmp_path / "r.json"]
    if source == "option":
        args += ["--timeout", "0.3"]
    else:
        (tmp_path / "pyproject.toml").write_text("[tool.gradscope]\ntimeout = 0.3\n")
    result = analyze_cli(*args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert any("probe stopped after 0 of 3 batches: --timeout 0.3 s" in n
               for n in doc["notes"]), doc["notes"]


@pytest.mark.parametrize("value", ["-1", "0", "true", '"soon"'])
def test_bad_timeout_setting_is_a_config_error(value: str, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(f"[tool.gradscope]\ntimeout = {value}\n")
    with pytest.raises(ConfigError, match="timeout"):
        load_settings(tmp_path)


@pytest.mark.parametrize("value", [0, -2.0, math.inf, "5"])
def test_bad_timeout_argument_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        gradscope.analyze(bn_mlp(), X, device="cpu", timeout=value)


def test_bad_timeout_option_is_a_usage_error(tmp_path: Path) -> None:
    result = analyze_cli(write_model(tmp_path, BN_MODEL), "--timeout", "0")
    assert result.exit_code == 2 and "--timeout" in result.stderr


# ------------------------------------------------------------------ memory check


def _tiny_memory(monkeypatch: pytest.MonkeyPatch, free: int = 100) -> list[str]:
    """Less than the gradients of ``bn_mlp`` (about 1 KB), as if memory were full."""
    asked: list[str] = []

    def available(device: str) -> int:
        asked.append(device)
        return free

    monkeypatch.setattr(gradscope.resources, "available_bytes", available)
    return asked


def test_footprint_counts_weights_buffers_and_trainable_gradients() -> None:
    model = bn_mlp()
    model[0].requires_grad_(False)
    size = footprint(model)
    params = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert size == Footprint(weights=params + buffers,
                             gradients=params - model[0].weight.numel() * 4
                             - model[0].bias.numel() * 4)


def test_model_too_large_for_memory_is_a_resource_error(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _tiny_memory(monkeypatch)
    model = bn_mlp()
    snap = prepared(model)
    with pytest.raises(ResourceError) as info:
        gradscope.analyze(model, X, device="cpu")
    line = info.value.one_line()
    assert "not enough memory" in line and " GB" in line and "--meta" in line
    assert asked == ["cpu"]
    snap.assert_unchanged()
    # Static analysis allocates nothing more: no check, a report.
    assert not gradscope.analyze(model, X, device="cpu", probe=False).probe.enabled


def test_factory_is_counted_on_meta_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_memory(monkeypatch)
    built: list[bool] = []

    def factory() -> nn.Module:
        layer = nn.Linear(1024, 1024)
        built.append(layer.weight.is_meta)
        return layer

    with pytest.raises(ResourceError, match="build the model") as info:
        gradscope.analyze(factory, torch.randn(2, 1024), device="cpu")
    assert "0.00391 GB" in info.value.one_line()  # 1024*1024 + 1024 floats
    assert built == [True], "only the meta build ran"


def test_factory_that_cannot_build_on_meta_is_built_unchecked() -> None:
    def factory() -> nn.Module:
        layer = nn.Linear(4, 2)
        if layer.weight.is_meta:
            raise RuntimeError("needs real weights")
        return layer

    report = gradscope.analyze(factory, torch.randn(3, 4), device="cpu")
    assert report.probe.enabled


def test_memory_check_via_the_cli_is_one_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_memory(monkeypatch)
    model = write_model(tmp_path, BN_MODEL)
    one_error_line(analyze_cli(model, "--input-shape", "4,8"), "not enough memory", "GB",
                   "--meta")
    assert analyze_cli(model, "--input-shape", "4,8", "--meta").exit_code in (0, 1)


def test_cpu_available_memory_reads_meminfo_and_the_cgroup_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if not installed
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(gradscope.resources, "_MEMINFO", meminfo)
    monkeypatch.setattr(gradscope.resources, "_CGROUP", cgroup)
    assert gradscope.resources.available_bytes("cpu") == 8000000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    assert gradscope.resources.available_bytes("cpu") == 8000000 * 1024
    (cgroup / "memory.max").write_text(f"{3 << 30}\n")
    (cgroup / "memory.current").write_text(f"{1 << 30}\n")
    assert gradscope.resources.available_bytes("cpu") == 2 << 30
    monkeypatch.setattr(gradscope.resources, "_MEMINFO", tmp_path / "missing")
    (cgroup / "memory.max").unlink()
    assert gradscope.resources.available_bytes("cpu") is None
    gradscope.resources.check_memory("cpu", weights=1 << 50)  # unknown: no check


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_check_uses_mem_get_info(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 1 << 40))
    model = bn_mlp()
    snap = prepared(model)
    with pytest.raises(ResourceError, match="on cuda") as info:
        gradscope.analyze(model, X, device="cuda")
    assert "weights" in info.value.one_line()  # the model would be moved there
    snap.assert_unchanged()
