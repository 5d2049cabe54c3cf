"""The rules over training steps (gradscope.watch), each on a record made to show its failure
and on a healthy one: a rule that fires on the healthy record, or not on its own, fails."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gradscope.rules.registry import RULES, STEP_CHECKS
from gradscope.rules.steps import run_step_rules
from gradscope.steps import LayerStep, StepRecord, TrainingRecord, loss_trend

STEP_CODES = ("GS105", "GS106", "GS203", "GS403", "GS503", "GS603", "GS604", "GS605",
              "GS606")


def _record(losses: list[float | None] | None = None, norms: list[float] | None = None,
            layers: dict[int, dict[str, dict[str, Any]]] | None = None, **kw: Any,
            ) -> TrainingRecord:
    """A 50-step watched run; ``layers``: recorded step -> module -> LayerStep fields."""
    steps = 50
    healthy_losses = [2.3 * math.exp(-i / 20) + 0.01 * ((i * 7919) % 13 - 6) / 6
                      for i in range(steps)]
    recorded = []
    for step in range(0, steps, 10):
        figures = {"fc1": {"grad_rms": 0.3, "update_ratio": 1e-3, "weight_norm": 4.0,
                           "weight_grad_norm": 0.1},
                   "act1": {"grad_rms": 0.3, "dead_fraction": 0.05},
                   "fc2": {"grad_rms": 0.8, "update_ratio": 2e-3, "weight_norm": 3.0,
                           "weight_grad_norm": 0.1}}
        for name, fields in (layers or {}).get(step, {}).items():
            figures.setdefault(name, {}).update(fields)
        recorded.append(StepRecord(step=step, output_grad_rms=0.05, layers={
            name: LayerStep(**fields) for name, fields in figures.items()}))
    base = dict(every=10, horizon=steps, optimizer="sgd", lr=0.1,
                modules={"fc1": "Linear", "act1": "ReLU", "fc2": "Linear"},
                trainable=("fc1", "fc2"), rectifiers=("act1",), squashers=(),
                losses=list(losses) if losses is not None else healthy_losses,
                grad_norms=list(norms) if norms is not None else [1.0] * steps,
                recorded=recorded)
    base.update(kw)
    return TrainingRecord(**base)  # type: ignore[arg-type]


def _codes(record: TrainingRecord) -> list[str]:
    return [f.rule for f in run_step_rules(record)]


def test_healthy_record_has_no_finding() -> None:
    assert _codes(_record()) == []


def test_every_step_code_is_registered_and_checked() -> None:
    checked = {code for check in STEP_CHECKS for code in check.codes}
    assert checked == set(STEP_CODES)
    for code in STEP_CODES:
        assert code in RULES and "gradscope.watch" in RULES[code].what


def test_gs105_collapse() -> None:
    late = {40: {"fc1": {"grad_rms": 0.02}}}
    assert _codes(_record(layers=late)) == ["GS105"]
    mild = {40: {"fc1": {"grad_rms": 0.05}}}  # a sixth: not an order of magnitude
    assert _codes(_record(layers=mild)) == []


def test_gs106_vanishing_at_every_step() -> None:
    always = {s: {"fc1": {"grad_rms": 5e-4}} for s in range(0, 50, 10)}
    assert _codes(_record(layers=always)) == ["GS106"]
    once = {s: {"fc1": {"grad_rms": 5e-4}} for s in range(10, 50, 10)}  # fine at step 0
    assert "GS106" not in _codes(_record(layers=once))


def test_gs203_growth_only_while_the_loss_does_not_fall() -> None:
    norms = [1.0] * 30 + [300.0] * 20
    stuck = [2.3 + 0.001 * (i % 3) for i in range(50)]
    assert "GS203" in _codes(_record(losses=stuck, norms=norms))
    # the same growth while the loss falls: a network leaving a small-logit start
    assert "GS203" not in _codes(_record(norms=norms))


def test_gs403_units_dying() -> None:
    dying = {40: {"act1": {"dead_fraction": 0.6}}}
    assert _codes(_record(layers=dying)) == ["GS403"]
    dead_from_start = {s: {"act1": {"dead_fraction": 0.6}} for s in range(0, 50, 10)}
    assert _codes(_record(layers=dead_from_start)) == []  # GS401's, before training


def test_gs503_nonfinite() -> None:
    losses: list[float | None] = [2.3 - 0.01 * i for i in range(50)]
    losses[17] = math.nan
    record = _record(losses=losses, first_nonfinite_step=17,
                     first_nonfinite_modules=("fc2", "fc1"))
    findings = run_step_rules(record)
    assert [f.rule for f in findings] == ["GS503"]
    assert findings[0].severity == "error" and findings[0].location.module == "fc2"
    assert "step 17" in findings[0].message


def test_gs603_update_band_is_information() -> None:
    fast = {s: {"fc2": {"update_ratio": 0.5}} for s in range(0, 50, 10)}
    findings = run_step_rules(_record(layers=fast))
    assert [(f.rule, f.severity) for f in findings] == [("GS603", "info")]
    frozen = {s: {"fc1": {"update_ratio": 1e-7}} for s in range(0, 50, 10)}
    assert _codes(_record(layers=frozen)) == ["GS603"]


def test_gs604_loss_rising_and_gs605_stalled() -> None:
    rising = [2.0 + 0.05 * i for i in range(50)]
    assert _codes(_record(losses=rising)) == ["GS604"]
    flat = [2.3 + 0.01 * (((i * 7919) % 13) - 6) / 6 for i in range(50)]
    assert _codes(_record(losses=flat)) == ["GS605"]
    slow = [2.3 - 0.002 * i + 0.01 * (((i * 7919) % 13) - 6) / 6 for i in range(50)]
    assert _codes(_record(losses=slow)) == []  # slow, but significant


def test_loss_trend_is_least_squares() -> None:
    record = _record(losses=[3.0 - 0.5 * i for i in range(30)])
    trend = loss_trend(record)
    assert trend is not None
    slope, t, n = trend
    assert slope == pytest.approx(-0.5) and n == 30 and t == -math.inf
    assert loss_trend(_record(losses=[1.0] * 10)) is None  # too few to judge


def test_no_loss_no_loss_rules() -> None:
    record = _record(losses=[None] * 50)
    assert _codes(record) == []


def test_gs606_spikes_are_information() -> None:
    losses: list[float | None] = [2.3 * math.exp(-i / 20) for i in range(50)]
    losses[30] = 3.0  # far above the ten before (about 0.5), a new high for the window
    findings = run_step_rules(_record(losses=losses))
    assert [(f.rule, f.severity) for f in findings] == [("GS606", "info")]
    assert "step 30" in findings[0].message
    noisy = [2.3 * math.exp(-i / 20) * (1.3 if i % 2 else 0.8) for i in range(50)]
    assert "GS606" not in _codes(_record(losses=noisy))  # minibatch noise, not a spike


def test_small_by_design_side_layers_are_not_vanishing() -> None:
    """Attention's query/key projections get a tiny gradient while the attention is still
    uniform: neither the input end (GS106) nor the healthy floor (GS105) is about them."""
    side = {s: {"q": {"grad_rms": 3e-4 / (1 + s / 10)}} for s in range(0, 50, 10)}
    record = _record(layers=side, modules={"fc1": "Linear", "q": "Linear", "act1": "ReLU",
                                           "fc2": "Linear"},
                     trainable=("fc1", "q", "fc2"))
    assert _codes(record) == []
    # the same figures at the input end are vanishing
    assert _codes(_record(layers=side, modules={"q": "Linear", "fc1": "Linear",
                                                 "act1": "ReLU", "fc2": "Linear"},
                          trainable=("q", "fc1", "fc2"))) == ["GS106"]


def test_a_fall_from_a_large_start_to_a_normal_level_is_not_a_collapse() -> None:
    large = {0: {"fc1": {"grad_rms": 60.0}}, 40: {"fc1": {"grad_rms": 0.3}}}
    assert _codes(_record(layers=large)) == []
