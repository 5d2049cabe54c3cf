"""Model changes tried by a short training run at the given rate (gradscope.trial).

Checked on real data (sklearn's digits): a change that makes the run break at the user's
rate is withdrawn with a note; the others carry the measured losses, which match an
independent training of the changed copy, and are ordered by them; the user's model is
not touched.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sklearn import datasets  # the test extra: a missing install fails, never skips
from torch import nn

import gradscope
from gradscope.fixes import apply
from gradscope.lr_range import run_range_test
from gradscope.records import Finding, Recommendation
from gradscope.trial import try_fixes


def _batches() -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    return [((x[i * 64:(i + 1) * 64],), y[i * 64:(i + 1) * 64]) for i in range(3)]


def _loss(output: torch.Tensor, inputs: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def _model(act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 64), act(),
                         nn.Linear(64, 10))


def _init(gain_sq: float) -> Recommendation:
    return Recommendation("initialization", f"init gain^2 {gain_sq:g}.", None,
                          action={"op": "init", "std_gain_sq": gain_sq, "zero_bias": True,
                                  "modules": ["0", "2", "4"]})


def _trial(model: nn.Module, recs: tuple[Recommendation, ...], lr: float,
           ) -> tuple[list[Finding], list[str]]:
    batches = _batches()
    test = run_range_test(model, batches, _loss, lr, "sgd", steps=20, factors=(1.0,))
    finding = Finding("GS101", "vanishing_gradient", "error", "m", recommendations=recs)
    return try_fixes(model, [finding], test, batches, _loss, momentum=0.0, weight_decay=0.0,
                     device="cpu", seed=0, mode="train", output=lambda out: out,
                     deadline=None)


def test_a_change_that_breaks_the_run_is_withdrawn() -> None:
    model = _model(nn.ReLU)
    before = copy.deepcopy(model.state_dict())
    huge, sane = _init(1e4), _init(1.0)
    [finding], notes = _trial(model, (huge, sane), lr=0.5)
    assert [r.action["std_gain_sq"] for r in finding.recommendations  # type: ignore[index]
            ] == [1.0]
    assert any("withdrawn" in n and "init" in n for n in notes)
    for key, value in model.state_dict().items():  # the user's model is not touched
        assert torch.equal(value, before[key])


def test_measured_losses_match_an_independent_run_and_order_the_changes() -> None:
    model = _model()
    small, sane, kaiming = _init(0.05), _init(1.0), _init(2.0)
    [finding], notes = _trial(model, (small, kaiming, sane), lr=0.1)
    measured = {r.action["std_gain_sq"]: r.measured  # type: ignore[index]
                for r in finding.recommendations}
    # Weights at 0.05 / fan_in learn less than the unchanged model: withdrawn.
    assert set(measured) == {1.0, 2.0}
    assert any("lowered the loss less than no change" in n for n in notes)
    drops = {}
    for gain, check in measured.items():
        assert check is not None
        changed = apply(copy.deepcopy(model), _init(gain), seed=0)
        run = run_range_test(changed, _batches(), _loss, 0.1, "sgd", steps=20, factors=(1.0,))
        assert run.given is not None
        assert check.after == pytest.approx(run.given.end, rel=1e-6)
        drops[gain] = run.given.drop
    order = [r.action["std_gain_sq"] for r in finding.recommendations]  # type: ignore[index]
    assert order == sorted(drops, key=lambda g: -drops[g])  # most of the loss removed first
    ends = [r.measured.after for r in finding.recommendations]  # type: ignore[union-attr]
    assert all(math.isfinite(e) for e in ends)
    assert "Measured: 20 steps at lr 0.1" in finding.recommendations[0].text


def test_analyze_tries_the_changes_only_with_a_range_test() -> None:
    """Through the API: with lr, loss and real batches the fixes carry a measurement."""
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.Sigmoid())],
                         nn.Linear(64, 10))
    batches = _batches()
    report = gradscope.analyze(deep, None, example_batches=batches, loss=_loss, lr=0.1,
                               optimizer="sgd", device="cpu")
    model_recs = [r for f in report.findings for r in f.recommendations
                  if r.action is not None and r.action["op"] not in
                  ("learning_rate", "warmup", "clip_grad_norm")]
    assert model_recs and all(r.measured is not None for r in model_recs)
    plain = gradscope.analyze(deep, (batches[0][0][0],), device="cpu")
    assert all(r.measured is None for f in plain.findings for r in f.recommendations)
