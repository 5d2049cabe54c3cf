"""End to end: every sample model through ``gradscope.analyze``, checked against its diagnosis.

Each sample is loaded the way the CLI loads it (``gradscope.loading.load_target``)
and analysed once per test session (the ``sample_report`` fixture of conftest.py).
The expected diagnoses come from sample_models/README.md, as far as the current
rules reach:

- vanishing (GS101 predicted + GS102 measured, status unhealthy):
  deep_sigmoid_mlp, plain_deep_cnn, dead_relu_mlp;
- exploding (GS201 + GS202): large_init_mlp;
- non-finite (GS501 at ``torch.log``): nan_model;
- no vanishing/exploding finding: relu_mlp_kaiming, resnet_bn, tuple_output_mlp,
  two_input_model, pre_ln/post_ln transformers, data_dependent;
- trace notes (GS801): data_dependent (runtime), both transformers (export);
- LSTM vanishes through time (GS103, from the estimate's unroll);
- Post-LN needs warmup (GS703), dead units (GS401/GS402), sigmoid hidden units
  (GS705): see ``DIAGNOSIS`` below, with the verified fix each one carries.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from helpers import SAMPLE_DIR, SAMPLES

import gradscope
from gradscope.rules.base import fmt as _fmt
from gradscope.schema import validate_report

VANISHING = ("deep_sigmoid_mlp", "plain_deep_cnn", "dead_relu_mlp")
EXPLODING = ("large_init_mlp",)
HEALTHY_FLOW = ("relu_mlp_kaiming", "resnet_bn", "tuple_output_mlp", "two_input_model",
                "pre_ln_transformer", "post_ln_transformer", "data_dependent")
GRADIENT_RULES = {"GS101", "GS102", "GS201", "GS202"}

TRACE_METHOD = {
    "data_dependent": "runtime",
    "pre_ln_transformer": "runtime",
    "post_ln_transformer": "runtime",
}
#: Samples whose root module is an nn.Sequential built in build_model(): no line of
#: the user's code calls their layers, so their nodes carry no source location.
SEQUENTIAL_ROOT = ("deep_sigmoid_mlp", "relu_mlp_kaiming", "large_init_mlp", "dead_relu_mlp")

#: Upper bounds on the median |log10(static_grad_rms / probe_grad_rms)| over the
#: layers that have both, with the value measured on torch 2.13.0, CPU (number of
#: layers compared in brackets). The MLPs are where mean-field theory is tight.
AGREEMENT = {
    "deep_sigmoid_mlp": 0.3,     # measured 0.0044 (20)
    "relu_mlp_kaiming": 0.3,     # measured 0.011 (40)
    "large_init_mlp": 0.3,       # measured 0.011 (40)
    "dead_relu_mlp": 0.3,        # measured 0.0024 (2: every other layer's gradient is 0)
    "tuple_output_mlp": 0.3,     # measured 0.0100 (12)
    "data_dependent": 0.3,       # measured 0.014 (10)
    "two_input_model": 0.3,      # measured 0.0085 (14)
    "lstm": 0.3,                 # measured 0.017 (5)
    "pre_ln_transformer": 0.3,   # measured 0.19 (213)
    "post_ln_transformer": 0.3,  # measured 0.18 (212)
    # 16-channel convs: the product of 19 random layer gains fluctuates by a few
    # times around the mean-field value (sample docstring), hence the looser bound.
    "plain_deep_cnn": 0.6,       # measured 0.41 (44)
    "resnet_bn": 0.6,            # measured 0.38 (72)
    # nan_model: no bound, its measured gradients are NaN.
}


def _rules(report: gradscope.Report) -> set[str]:
    return {f.rule for f in report.findings}


# ---------------------------------------------------------------------------
# Every sample


@pytest.mark.parametrize("name", SAMPLES)
def test_report_is_valid(sample_report: Any, name: str) -> None:
    _, report, doc = sample_report(name)
    validate_report(doc)
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN/Infinity anywhere
    assert doc["status"] == report.status
    assert doc["model"]["device"] == "cpu"
    assert doc["probe"]["enabled"] is True
    assert doc["model"]["num_parameters"] > 0
    assert doc["layers"], "no layers reported"
    cov = doc["model"]["trace"]["coverage"]
    assert 0.0 <= cov <= 1.0


@pytest.mark.parametrize("name", SAMPLES)
def test_layers_in_topological_order(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    position = {layer.name: i for i, layer in enumerate(report.layers)}
    assert len(position) == len(report.layers), "duplicate layer names"
    depth = {layer.name: layer.depth for layer in report.layers}
    edges = 0
    for i, layer in enumerate(report.layers):
        for src in layer.inputs:
            if src in position:
                edges += 1
                assert position[src] < i, f"{src} is reported after its consumer {layer.name}"
                assert depth[src] <= depth[layer.name], (src, layer.name)
        if layer.op == "input":
            assert layer.depth == 0
        else:
            assert layer.depth >= 1
    assert edges >= len(report.layers) - sum(1 for la in report.layers if la.op == "input")


@pytest.mark.parametrize("name", (*VANISHING, *EXPLODING, "relu_mlp_kaiming",
                                  "tuple_output_mlp"))
def test_trainable_layers_get_deeper(sample_report: Any, name: str) -> None:
    """Along the main path of every plain stack, depth strictly grows layer after layer."""
    _, report, _ = sample_report(name)
    depths = [layer.depth for layer in report.layers if layer.num_params > 0]
    assert len(depths) >= 6
    assert all(a < b for a, b in itertools.pairwise(depths)), depths


@pytest.mark.parametrize("name", SAMPLES)
def test_trace_method(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    trace = report.model.trace
    method = TRACE_METHOD.get(name, "symbolic_trace")
    assert trace.method == method
    assert trace.attempts[-1].method == method and trace.attempts[-1].ok
    failed = [a for a in trace.attempts if not a.ok]
    if method == "symbolic_trace":
        assert not failed and "GS801" not in _rules(report)
    else:
        assert failed[0].method == "symbolic_trace"
        assert all(a.message for a in failed)
        gs801 = [f for f in report.findings if f.rule == "GS801"]
        assert len(gs801) == 1
        assert "symbolic_trace failed" in gs801[0].message
    if method == "runtime":  # the probe runs: the recorder comes before torch.export
        assert [a.method for a in failed] == ["symbolic_trace"]


def _forward_lines(path: Path) -> set[int]:
    """Line numbers inside the bodies of the file's ``forward`` methods."""
    tree = ast.parse(path.read_text())
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "forward":
            lines.update(range(node.body[0].lineno, (node.end_lineno or node.lineno) + 1))
    return lines


@pytest.mark.parametrize("name", [s for s in SAMPLES
                                  if s not in SEQUENTIAL_ROOT and s not in TRACE_METHOD])
def test_source_locations(sample_report: Any, name: str) -> None:
    """Symbolic traces of user-written forwards: every module call has its file:line."""
    _, report, _ = sample_report(name)
    assert report.model.trace.method == "symbolic_trace"
    path = (SAMPLE_DIR / f"{name}.py").resolve()
    inside_forward = _forward_lines(path)
    modules = [layer for layer in report.layers if layer.kind == "call_module"]
    assert modules
    for layer in modules:
        assert layer.file == str(path), (layer.name, layer.file)
        assert layer.line in inside_forward, (layer.name, layer.line)


@pytest.mark.parametrize("name", SAMPLES)
def test_probed_output(sample_report: Any, name: str) -> None:
    _, report, doc = sample_report(name)
    expected = {"two_input_model": "output['logits']", "tuple_output_mlp": "output[0]"}
    assert report.model.output == expected.get(name, "output")
    assert doc["model"]["output"] == report.model.output
    # The output layer is the reference of every probe_grad_rms: exactly 1 there.
    if name != "nan_model":
        assert report.probe.output_grad_rms is not None and report.probe.output_grad_rms > 0
        assert any(layer.probe_grad_rms == pytest.approx(1.0) for layer in report.layers)


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_static_and_probe_agree(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    logs = [abs(math.log10(layer.static_grad_rms / layer.probe_grad_rms))
            for layer in report.layers
            if layer.static_grad_rms and layer.probe_grad_rms
            and layer.static_grad_rms > 0 and layer.probe_grad_rms > 0]
    assert len(logs) >= 2
    median = statistics.median(logs)
    assert median <= AGREEMENT[name], f"{name}: median |log10 static/probe| = {median:.3f}"


# ---------------------------------------------------------------------------
# Diagnoses


@pytest.mark.parametrize("name", VANISHING)
def test_vanishing(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    assert report.status == "unhealthy"
    found = {f.rule: f for f in report.findings}
    assert {"GS101", "GS102"} <= set(found)
    assert not {"GS201", "GS202"} & set(found)
    for code in ("GS101", "GS102"):
        finding = found[code]
        assert finding.severity == "error" and finding.category == "vanishing_gradient"
        assert finding.evidence["gradient_ratio"] < 1e-3
        assert finding.recommendations
    # The starved layer is the first trainable one, where the gradient is smallest.
    first = next(layer for layer in report.layers if layer.num_params > 0)
    assert found["GS102"].location.node == first.name
    assert found["GS102"].location.module == first.module


@pytest.mark.parametrize("name", EXPLODING)
def test_exploding(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    assert report.status == "unhealthy"
    found = {f.rule: f for f in report.findings}
    assert {"GS201", "GS202"} <= set(found)
    assert not {"GS101", "GS102"} & set(found)
    for code in ("GS201", "GS202"):
        assert found[code].category == "exploding_gradient"
        assert found[code].evidence["gradient_ratio"] > 1e3  # measured ~5e5 (2^19)
    kinds = {r.kind for r in found["GS202"].recommendations}
    assert {"gradient_clipping", "initialization"} <= kinds


def test_nan_points_at_torch_log(sample_report: Any) -> None:
    _, report, _ = sample_report("nan_model")
    path = (SAMPLE_DIR / "nan_model.py").resolve()
    lines = path.read_text().splitlines()
    log_line = 1 + next(i for i, text in enumerate(lines)
                        if "torch.log(" in text and not text.lstrip().startswith(("#", '"'))
                        and "=" in text)
    assert report.status == "unhealthy"
    found = {f.rule: f for f in report.findings}
    assert "GS501" in found
    loc = found["GS501"].location
    assert loc.file == str(path)
    assert loc.line == log_line
    assert loc.node == "log"
    assert found["GS501"].category == "nonfinite"
    # NaN makes the gradient ratios meaningless: no vanishing/exploding verdict on them.
    assert not {"GS102", "GS202"} & set(found)
    assert report.probe.nonfinite_forward == "log"
    flagged = [layer.name for layer in report.layers if layer.nonfinite_forward]
    assert flagged[0] == "log" and "fc1" not in flagged


@pytest.mark.parametrize("name", HEALTHY_FLOW)
def test_no_gradient_finding(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    assert not GRADIENT_RULES & _rules(report), [f.message for f in report.findings]
    assert report.status != "unhealthy"


def test_transformers_are_recorded_layer_by_layer(sample_report: Any) -> None:
    for name in ("pre_ln_transformer", "post_ln_transformer"):
        _, report, _ = sample_report(name)
        assert report.model.trace.method == "runtime"
        assert "GS801" in _rules(report)
        modules = {layer.module for layer in report.layers if layer.module}
        # The encoder is seen layer by layer, not as one opaque node.
        assert {"encoder.layers.0.linear1", "encoder.layers.5.linear2", "head"} <= modules
        # Post-LN needs warmup (GS703, a warning); Pre-LN is healthy.
        assert report.status == ("warning" if name.startswith("post") else "healthy")


def test_data_dependent_runtime_graph(sample_report: Any) -> None:
    _, report, _ = sample_report("data_dependent")
    assert report.model.trace.method == "runtime"
    assert "GS801" in _rules(report)
    modules = {layer.module for layer in report.layers if layer.module}
    assert {"branch_b.0", "branch_b.4"} <= modules  # the branch that ran (batch mean < 0)
    assert not any(m.startswith("branch_a") for m in modules)
    assert any("branches" in note for note in report.notes)


def test_lstm_vanishes_through_time(sample_report: Any) -> None:
    """Forget-gate bias 0 over 100 steps: measured first/last input-gradient ratio 4.7e-21
    (tests/test_sample_models_ground_truth.py); the unrolled estimate predicts ~1e-20."""
    _, report, _ = sample_report("lstm")
    found = {f.rule: f for f in report.findings}
    assert "GS103" in found and found["GS103"].severity == "error"
    ratio = found["GS103"].evidence["gradient_ratio"]
    assert isinstance(ratio, float) and 1e-23 < ratio < 1e-17
    assert found["GS103"].location.module == "lstm"
    assert any(r.kind == "initialization" and "forget" in r.text
               for r in found["GS103"].recommendations)
    assert report.model.trace.coverage == 1.0
    lstm = next(layer for layer in report.layers if layer.op == "LSTM")
    assert lstm.understood


def test_dead_relu_layers_are_dead(sample_report: Any) -> None:
    """The measured dead fraction reaches 1 from hidden layer 6 on (README: exactly 0 active)."""
    _, report, _ = sample_report("dead_relu_mlp")
    dead = [layer.dead_fraction for layer in report.layers if layer.op == "ReLU"]
    assert len(dead) == 7
    assert dead[5] == 1.0 and dead[6] == 1.0
    assert dead[0] < 1.0
    weights = [layer.param_grad_ratio for layer in report.layers if layer.op == "Linear"]
    assert all(r == 0.0 for r in weights[:-1])  # every hidden weight gradient is exactly 0


def test_saturation_measured_on_sigmoid(sample_report: Any) -> None:
    _, report, _ = sample_report("deep_sigmoid_mlp")
    sat = [layer.saturated_fraction for layer in report.layers if layer.op == "Sigmoid"]
    assert len(sat) == 9 and all(s is not None and 0.0 <= s <= 1.0 for s in sat)


#: The diagnosis each sample's docstring states: (rule, the recommendation kind that
#: must come verified with it, or None where no change of the model applies).
DIAGNOSIS: dict[str, list[tuple[str, str | None]]] = {
    "deep_sigmoid_mlp": [("GS101", "activation"), ("GS102", "activation"),
                         ("GS705", "activation")],
    "plain_deep_cnn": [("GS101", "initialization"), ("GS102", "residual_connection")],
    "large_init_mlp": [("GS201", "initialization"), ("GS202", "normalization")],
    "dead_relu_mlp": [("GS401", "initialization"), ("GS402", "initialization")],
    "post_ln_transformer": [("GS703", "normalization")],
    "lstm": [("GS103", "initialization")],
    "nan_model": [("GS501", None)],
    "data_dependent": [("GS801", None)],
}
HEALTHY = ("relu_mlp_kaiming", "resnet_bn", "tuple_output_mlp", "two_input_model",
           "pre_ln_transformer")


@pytest.mark.parametrize("name", sorted(DIAGNOSIS))
def test_sample_diagnosis_with_verified_fix(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    found = {f.rule: f for f in report.findings}
    for code, kind in DIAGNOSIS[name]:
        assert code in found, f"{name}: {code} missing from {sorted(found)}"
        if kind is None:
            continue
        fixes = [r for r in found[code].recommendations if r.kind == kind]
        assert fixes and fixes[0].verified is not None, f"{name}: {code} has no verified {kind}"
        check = fixes[0].verified
        assert check.before != check.after
        # the text states the same before -> after the verification measured
        assert f"from {_fmt(check.before)} to {_fmt(check.after)}" in fixes[0].text
        assert fixes[0].code


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_samples_are_healthy(sample_report: Any, name: str) -> None:
    _, report, _ = sample_report(name)
    assert report.status == "healthy", [(f.rule, f.severity) for f in report.findings]
