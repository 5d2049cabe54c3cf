"""The learning-rate range test and the GS601 advice built on it (issue 14, item 3).

The advice is checked the way it will be used: applied to a real training run on
real data (sklearn's digits), against the given rate. The search's early stopping
is checked against the brute force (every factor of the grid run), and the factor
choice against an independent reading of its definition on random outcomes.
"""

from __future__ import annotations

import json
import math
import random
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import cli_runner
from sklearn import datasets  # the test extra: a missing install fails, never skips
from torch import nn

import gradscope
from gradscope.cli import main
from gradscope.loading import load_target
from gradscope.lr_range import FACTORS, RangeRun, choose_factor, clamp_lr, run_range_test
from gradscope.schema import validate_report

BATCH = 64


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def _batches(count: int = 3, offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _digits()
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            for i in range(offset, offset + count)]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _loss(output: torch.Tensor, inputs: tuple[Any, ...], target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def _train(model: nn.Module, lr: float, steps: int) -> float:
    """Plain SGD training on digits (batches beyond the range test's), final mean loss."""
    x, y = _digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(0)
    for step in range(steps):
        i = (step % 20) * BATCH
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH])
        if not torch.isfinite(loss):
            return math.inf
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    return final if math.isfinite(final) else math.inf


def _gs601(report: Any) -> list[Any]:
    return [f for f in report.findings if f.rule == "GS601"]


def test_diverging_sgd_gets_a_measured_rate_that_trains() -> None:
    """SGD at lr 10 fails on digits; the advised rate, applied, trains and beats it."""
    model = _mlp()
    report = gradscope.analyze(model, None, example_batches=_batches(), loss=_loss, lr=10.0,
                               optimizer="sgd", device="cpu")
    [finding] = _gs601(report)
    assert finding.severity == "error"
    [rec] = finding.recommendations
    assert rec.kind == "learning_rate" and rec.action is not None
    assert rec.action["op"] == "learning_rate"
    advised, factor = rec.action["lr"], rec.action["factor"]
    assert 10.0 / 100 <= advised <= 10.0 * 100
    assert advised == pytest.approx(10.0 * factor)
    assert factor < 1  # lr 10 diverges: the advice is smaller
    assert finding.evidence["advised_lr"] == pytest.approx(advised)
    assert finding.evidence["loss_start"] is not None
    assert f"{advised:.3g}" in rec.text and "range test" in finding.message
    compile(rec.code or "", "<recommendation>", "exec")  # the snippet is valid Python
    validate_report(report.to_dict())
    # Applied: 100 steps at the advised rate end lower than at the given one.
    given = _train(_mlp(), 10.0, 100)
    fixed = _train(_mlp(), advised, 100)
    assert fixed < given
    assert fixed < 0.5 * math.log(10)  # it really trains (chance is ln 10)


def test_healthy_adam_gets_no_learning_rate_advice() -> None:
    report = gradscope.analyze(_mlp(), None, example_batches=_batches(), loss=_loss, lr=1e-3,
                               optimizer="adam", device="cpu")
    assert _gs601(report) == []
    assert not any(r.kind == "learning_rate" for f in report.findings
                   for r in f.recommendations)
    assert any("range test" in n and "no learning-rate advice" in n for n in report.notes)


def test_sgd_that_trains_gets_no_advice() -> None:
    report = gradscope.analyze(_mlp(), None, example_batches=_batches(), loss=_loss, lr=0.1,
                               optimizer="sgd", device="cpu")
    assert _gs601(report) == []


def test_the_users_model_is_left_bit_for_bit() -> None:
    from test_state import Snapshot, _prepare

    model = _mlp()
    _prepare(model)
    torch.manual_seed(1234)
    snap = Snapshot(model)
    report = gradscope.analyze(model, None, example_batches=_batches(), loss=_loss, lr=10.0,
                               optimizer="sgd", momentum=0.9, device="cpu")
    assert any("range test" in n for n in report.notes)
    snap.assert_unchanged()


def test_early_stopping_finds_what_the_whole_grid_finds() -> None:
    """The search stops early; every factor of the grid run alone gives the same choice."""
    batches = [((x,), y) for x, y in _batches()]
    # lr 10 diverges (the search goes down), lr 0.003 barely moves the loss (it goes up).
    for lr, direction in ((10.0, -1), (0.003, 1)):
        test = run_range_test(_mlp(), batches, _loss, lr, "sgd", steps=30)
        assert test.factor is not None and (test.factor - 1) * direction > 0
        assert len(test.runs) < len(FACTORS)  # it did stop early
        full = []
        for f in FACTORS:
            [alone] = run_range_test(_mlp(), batches, _loss, lr * f, "sgd", steps=30,
                                     factors=(1.0,)).runs
            full.append(RangeRun(**{**alone.__dict__, "factor": f}))
        for run in test.runs:  # the runs made are the brute force's, figure for figure
            twin = next(r for r in full if r.factor == run.factor)
            assert run.end == twin.end or (math.isnan(run.end) and math.isnan(twin.end))
        assert test.factor == choose_factor(full), (lr, [r.describe() for r in full])


def _random_run(factor: float, rng: random.Random) -> RangeRun:
    kind = rng.choice(["nan", "rise", "flat", "slow", "trained", "spike"])
    start = 2.0
    end = {"nan": math.nan, "rise": 2.5, "flat": 1.99, "slow": 1.9, "trained": 1.0,
           "spike": 1.0}[kind]
    peak = 5.0 if kind == "spike" else start
    return RangeRun(factor=factor, lr=factor, start=start, end=end, first=start, last=end,
                    peak=peak, steps=30, nonfinite_step=3 if kind == "nan" else None)


def test_choice_matches_its_definition_on_random_outcomes() -> None:
    """Advice only when factor 1 failed; the largest trained factor whose next one trained."""
    rng = random.Random(0)
    for _ in range(2000):
        runs = [_random_run(f, rng) for f in FACTORS]
        got = choose_factor(runs)
        status = {r.factor: r.status for r in runs}
        if status[1.0] not in ("diverged", "flat"):
            assert got is None
            continue
        expected = None
        for i, f in enumerate(FACTORS[:-1]):  # brute force: scan every pair
            if f != 1.0 and status[f] == "trained" and status[FACTORS[i + 1]] == "trained":
                expected = f
        assert got == expected
        if got is not None:
            assert 0.01 <= got <= 100 and got != 1.0


@pytest.mark.parametrize("lr", [1e-6, 1e-3, 0.1, 10.0, 1e4])
def test_advised_rate_never_leaves_the_range(lr: float) -> None:
    for factor in (*FACTORS, 1e-9, 1e9):
        advised = clamp_lr(lr * factor, lr)
        assert lr / 100 * (1 - 1e-12) <= advised <= lr * 100 * (1 + 1e-12)


def test_no_range_test_without_a_loss_function_and_the_message_says_so() -> None:
    """The dot loss is not the model's: facts only, no factor, what would enable it said."""
    model = _mlp()
    report = gradscope.analyze(model, (_batches()[0][0],), lr=10.0, optimizer="sgd",
                               device="cpu")
    assert not any("range test (" in n for n in report.notes)
    for finding in _gs601(report):
        assert finding.severity == "info"
        assert "loss_fn" in finding.message
        assert all(r.kind != "learning_rate" for r in finding.recommendations)


def test_two_argument_loss_fn_on_example_inputs_runs_one_batch_repeated() -> None:
    x, y = _batches()[0]

    def loss_fn(output: torch.Tensor, inputs: tuple[Any, ...]) -> torch.Tensor:
        return F.cross_entropy(output, y)

    report = gradscope.analyze(_mlp(), (x,), loss=loss_fn, lr=10.0, optimizer="sgd",
                               device="cpu")
    assert report.probe.loss == "loss_fn(output, inputs)"
    assert any("over 1 batch(es)" in n for n in report.notes)
    [finding] = _gs601(report)
    assert finding.recommendations[0].action["op"] == "learning_rate"  # type: ignore[index]


def test_lr_range_off_and_no_probe_run_no_range_test() -> None:
    for options in ({"lr_range": False}, {"probe": False}):
        report = gradscope.analyze(_mlp(), None, example_batches=_batches(), loss=_loss,
                                   lr=10.0, optimizer="sgd", device="cpu", **options)
        assert not any("range test (" in n for n in report.notes)
        assert all(f.severity == "info" for f in _gs601(report))


def test_real_batches_are_probed_instead_of_synthetic_ones() -> None:
    """The probe's figures come from the given batches: a brute-force gradient agrees."""
    batches = _batches(2)
    model = _mlp()
    report = gradscope.analyze(model, None, example_batches=batches, loss=_loss, batches=2,
                               device="cpu")
    assert report.probe.loss == "loss_fn(output, inputs, target)"
    assert any("real batch" in n for n in report.notes)
    # ||grad W|| of the last layer, mean of squares over the two real batches.
    last = model[2]
    sq = 0.0
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), last.weight)[0]
        sq += float(g.double().pow(2).sum())
    expected = math.sqrt(sq / 2)
    layer = next(lay for lay in report.layers if lay.module == "2")
    assert layer.param_grad_norm == pytest.approx(expected, rel=1e-4)


MODEL_FILE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn


    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


    def example_batches():
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        return [(x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64]) for i in range(3)]


    def loss_fn(output, inputs, target):
        return F.cross_entropy(output, target)
""")


def test_example_batches_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    path = tmp_path / "digits_model.py"
    path.write_text(MODEL_FILE, encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    loaded = load_target(str(path))
    assert loaded.batches is not None and len(loaded.batches) == 3
    assert torch.equal(loaded.inputs[0], loaded.batches[0][0][0])
    result = cli_runner().invoke(main, ["analyze", str(path), "--lr", "10", "--device", "cpu",
                                        "--json", "-", "--fail-on", "never"],
                                 catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    [finding] = [f for f in doc["findings"] if f["rule"] == "GS601"]
    assert finding["severity"] == "error"
    action = finding["recommendations"][0]["action"]
    assert action["op"] == "learning_rate" and 0.1 <= action["lr"] <= 1000
    assert doc["probe"]["loss"] == "loss_fn(output, inputs, target)"
    # --no-lr-range: the same file, no range test, no factor.
    result = cli_runner().invoke(main, ["analyze", str(path), "--lr", "10", "--device", "cpu",
                                        "--json", "-", "--fail-on", "never", "--no-lr-range"],
                                 catch_exceptions=False)
    doc = json.loads(result.stdout)
    assert all(r["kind"] != "learning_rate" for f in doc["findings"]
               for r in f["recommendations"])


def test_input_shape_makes_the_inputs_synthetic(tmp_path: Path) -> None:
    path = tmp_path / "digits_model.py"
    path.write_text(MODEL_FILE, encoding="utf-8")
    loaded = load_target(str(path), input_shapes=["8,64"])
    assert loaded.synthetic_inputs and loaded.batches is None
    assert any("example_batches() of the file was not used" in n for n in loaded.notes)


@pytest.mark.parametrize("body, fragment", [
    ("return torch.zeros(3)", "not a list of batches"),
    ("return []", "no batch"),
    ("return [(torch.zeros(2, 64),)]", "not an (inputs, target) pair"),
])
def test_bad_example_batches_are_one_line_errors(tmp_path: Path, body: str,
                                                 fragment: str) -> None:
    from gradscope.errors import InputError

    path = tmp_path / "m.py"
    path.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn
        model = nn.Linear(64, 10)
        def example_batches():
            {body}
    """), encoding="utf-8")
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_target(str(path))


TWO_ARG_FILE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    _DATA = load_digits()
    X = torch.tensor(_DATA.data[:64], dtype=torch.float32) / 16.0
    Y = torch.tensor(_DATA.target[:64])


    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


    def example_inputs():
        return X


    def loss_fn(output, inputs):
        return F.cross_entropy(output, Y)
""")


def test_two_argument_loss_fn_file_through_the_cli(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """example_inputs() + loss_fn(output, inputs): the range test runs on that one batch;
    --input-shape makes the inputs synthetic and no range test runs."""
    path = tmp_path / "two_arg.py"
    path.write_text(TWO_ARG_FILE, encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    common = ["analyze", str(path), "--lr", "10", "--device", "cpu", "--json", "-",
              "--fail-on", "never"]
    doc = json.loads(cli_runner().invoke(main, common, catch_exceptions=False).stdout)
    assert doc["probe"]["loss"] == "loss_fn(output, inputs)"
    assert any("range test (sgd, 30 steps per run over 1 batch(es)" in n for n in doc["notes"])
    doc = json.loads(cli_runner().invoke(main, [*common, "--input-shape", "64,64"],
                                         catch_exceptions=False).stdout)
    assert not any("range test (" in n for n in doc["notes"])
    [finding] = [f for f in doc["findings"] if f["rule"] == "GS601"]  # lr 10: ratio ~2
    assert finding["severity"] == "info" and "made up" in finding["message"]
    assert all(r["action"] is None for r in finding["recommendations"])


@pytest.mark.parametrize("batches", [[], torch.zeros(3), [(torch.zeros(2, 64),)], "xy"])
def test_bad_example_batches_in_the_api(batches: Any) -> None:
    from gradscope.errors import InputError

    with pytest.raises(InputError, match="example_batches"):
        gradscope.analyze(_mlp(), None, example_batches=batches, device="cpu")
