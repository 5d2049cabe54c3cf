"""One model of the analysis: each rule in one place, selection before a rule runs, and one
measure of gradient health that the findings and every view agree on."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import SAMPLE_DIR, SAMPLES

import gradscope
from gradscope.loading import load_target
from gradscope.options import Thresholds
from gradscope.records import Finding
from gradscope.rules import registry
from gradscope.rules.analysis import run_rules
from gradscope.rules.base import Check
from gradscope.rules.health import classify
from gradscope.rules.selection import RuleSelection

PACKAGE = Path(gradscope.__file__).resolve().parent
FAMILY_FILES = {1: "vanishing.py", 2: "exploding.py", 3: "saturation.py", 4: "dead_units.py",
                5: "nonfinite.py", 6: "learning_rate.py", 7: "architecture.py", 8: "trace.py"}
GRADIENT_RULES = {"GS101", "GS102", "GS201", "GS202"}
NONFINITE_RULES = {"GS501", "GS502"}
_RANK = {"info": 0, "warning": 1, "error": 2}
_CLASS_OF = {"warning": "warn", "error": "bad"}


# ------------------------------------------------------------------ each rule in one place


def _rule_definitions() -> dict[str, list[str]]:
    """Every ``Rule(code="GS...")`` written anywhere in the package, by code."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rule":
                for kw in node.keywords:
                    if kw.arg == "code" and isinstance(kw.value, ast.Constant):
                        found.setdefault(str(kw.value.value), []).append(
                            str(path.relative_to(PACKAGE)))
    return found


def test_each_rule_code_is_defined_in_exactly_one_module_of_its_family() -> None:
    found = _rule_definitions()
    assert set(found) == set(registry.RULES), "every registered code is defined, and only those"
    for code, places in found.items():
        assert len(places) == 1, f"{code} is defined in {places}"
        assert places[0] == f"rules/{FAMILY_FILES[int(code[2])]}", (code, places)


def test_each_family_module_runs_only_its_own_codes() -> None:
    for module in registry.FAMILY_MODULES:
        own = {rule.code for rule in module.FAMILY.rules}
        checks = (*module.FAMILY.checks, *module.FAMILY.step_checks)
        for check in checks:
            assert set(check.codes) <= own, (module.__name__, check.codes)
        emitted = {code for check in checks for code in check.codes}
        assert emitted == own, f"{module.__name__}: every rule has a check"
        before = {code for check in module.FAMILY.checks for code in check.codes}
        during = {code for check in module.FAMILY.step_checks for code in check.codes}
        assert not before & during, "a code is judged before training or over steps, not both"


def test_family_modules_and_the_registry_do_not_import_torch() -> None:
    """The rules reach torch only through analysis.fixer, so `gradscope rules`, the settings
    and the renderers can read the registry without it."""
    light = ["rules/base.py", "rules/registry.py", "rules/health.py", "rules/selection.py",
             *(f"rules/{name}" for name in FAMILY_FILES.values())]
    for name in light:
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        heavy = {m for m in imported if m == "torch" or m.startswith("torch.")
                 or m in ("gradscope.rules.fixes", "gradscope.rules.variants",
                          "gradscope.rules.analysis", "gradscope.estimate.engine")}
        top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert not (heavy & top_level), (name, heavy & top_level)


# ------------------------------------------------------------------ selection before running


def _exploding_check(_analysis: Any) -> list[Finding]:
    raise AssertionError("a deselected check ran")


def test_selection_decides_before_a_check_runs() -> None:
    ran: list[str] = []

    def gs104(_analysis: Any) -> list[Finding]:
        ran.append("GS104")
        return [registry.get_rule("GS104").finding("kept")]

    def plain(_analysis: Any) -> list[Finding]:
        ran.append("GS7")
        return [registry.get_rule("GS701").finding("a"), registry.get_rule("GS706").finding("b")]

    checks = [Check(("GS101",), _exploding_check), Check(("GS104",), gs104),
              Check(("GS701", "GS706"), plain)]
    selection = RuleSelection(ignore=("GS101", "GS706"))
    findings, not_run = run_rules(object(), selection, checks)  # type: ignore[arg-type]
    assert ran == ["GS104", "GS7"]
    assert [f.rule for f in findings] == ["GS104", "GS701"], "GS706 dropped after its check"
    assert not_run == ["GS101", "GS706"]


def test_a_deselected_rule_costs_no_fix_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """GS703's Pre-LN fix re-estimates a changed copy of the model; ignored, it never runs."""
    from gradscope.rules.fixes import Fixer

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the Pre-LN what-if ran although GS703 is ignored")

    monkeypatch.setattr(Fixer, "pre_ln", refuse)
    loaded = load_target(str(SAMPLE_DIR / "post_ln_transformer.py"))
    report = gradscope.analyze(loaded.model, loaded.inputs, device="cpu", probe=False,
                               ignore=["GS703"])
    assert "GS703" not in {f.rule for f in report.findings}
    assert any("not run" in n and "GS703" in n for n in report.notes)


# ------------------------------------------------------------------ one measure of health


def test_a_measurement_outranks_the_prediction_at_the_same_layer() -> None:
    """20-conv Kaiming CNN: the estimate said 9.2e-3 (a warning), the probe 0.19."""
    from gradscope.rules.health import HealthTable

    t = Thresholds()
    table = HealthTable(thresholds=t, entries=("a", "b"),
                        predicted={"a": 9.2e-3, "b": 5e-4}, measured={"a": 0.19, "b": 4e-3},
                        measured_judged=True)
    assert table.of("a").cls == "ok" and table.of("a").source == "measured"
    assert table.of("b").cls == "warn", "measured warn outranks predicted bad"
    # The predicted finding points at the layer the measurement confirms, at its class.
    assert table.predicted_extreme(low=True) == ("b", 5e-4, "warn")
    unmeasured = HealthTable(thresholds=t, entries=("a",), predicted={"a": 9.2e-3})
    assert unmeasured.of("a").cls == "warn" and unmeasured.of("a").source == "predicted"
    assert unmeasured.predicted_extreme(low=True) == ("a", 9.2e-3, "warn")
    healthy = HealthTable(thresholds=t, entries=("a",), predicted={"a": 9.2e-3},
                          measured={"a": 0.19}, measured_judged=True)
    assert healthy.predicted_extreme(low=True) is None


def test_a_normalised_entry_is_not_judged_on_the_exploding_side() -> None:
    """Conv + BatchNorm: the conv's weights are scale-invariant (ResNet-50, EfficientNet)."""
    from gradscope.rules.health import SCALE_INVARIANT, HealthTable

    t = Thresholds()
    table = HealthTable(thresholds=t, entries=("stem", "plain"),
                        predicted={"stem": 300.0, "plain": 300.0},
                        measured={"stem": 250.0, "plain": 250.0}, measured_judged=True,
                        normalised=frozenset({"stem"}))
    assert table.of("stem").cls is None and table.of("stem").note == SCALE_INVARIANT
    assert table.of("plain").cls == "warn"
    assert table.finding_at(low=False, measured=True)[0] == "plain"  # type: ignore[index]
    only = HealthTable(thresholds=t, entries=("stem",), measured={"stem": 250.0},
                       measured_judged=True, normalised=frozenset({"stem"}))
    assert only.finding_at(low=False, measured=True) is None
    small = HealthTable(thresholds=t, entries=("stem",), measured={"stem": 1e-4},
                        measured_judged=True, normalised=frozenset({"stem"}))
    assert small.of("stem").cls == "bad", "vanishing is still judged"


@pytest.mark.parametrize(("ratio", "cls"), [
    (1.0, "ok"), (0.01, "ok"), (100.0, "ok"), (0.0099, "warn"), (0.001, "warn"),
    (100.5, "warn"), (1000.0, "warn"), (0.00099, "bad"), (0.0, "bad"), (1000.5, "bad"),
    (None, None), (math.inf, None), (math.nan, None),
])
def test_classify_uses_the_rules_bounds(ratio: float | None, cls: str | None) -> None:
    """The rules warn below vanishing_warning and err below vanishing_error (strictly), and
    likewise above the exploding thresholds: the classes are those comparisons."""
    assert classify(ratio, Thresholds()) == cls


def test_health_of_a_small_model_against_brute_force_autograd() -> None:
    """The measured health of the entry layer is the gradient-norm ratio autograd gives."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4))
    x = torch.randn(8, 16)
    report = gradscope.analyze(model, (x,), device="cpu", batches=1)
    entry = next(layer for layer in report.layers if layer.health_class is not None)
    assert entry.health_source == "measured" and entry.name == "_0"
    # Brute force: the probe's loss is <output, its seeded direction>; autograd with the
    # same direction must give the same gradient-norm ratio (no averaging op to discount).
    from gradscope.probe import _loss

    h = model[0](x)
    h.retain_grad()
    out = model[4](model[3](model[2](model[1](h))))
    out.retain_grad()
    value, _ = _loss(out, (x,), "dot", 0)
    value.backward()
    ratio = float(h.grad.norm() / out.grad.norm())  # type: ignore[union-attr]
    assert math.isclose(report.layer("_0").health_measured or 0.0, ratio, rel_tol=1e-4)


@pytest.fixture(scope="module")
def sample_docs(sample_report: Any) -> Any:
    """The session's shared analysis of each sample (tests/conftest.py), as its JSON doc."""
    return lambda name: sample_report(name).doc


def _direction(finding: dict[str, Any]) -> str:
    return "low" if finding["rule"] in ("GS101", "GS102") else "high"


@pytest.mark.parametrize("name", SAMPLES)
def test_health_classes_agree_with_the_findings(sample_docs: Any, name: str) -> None:
    """A layer is shown warn/bad exactly where the rules judge it so, with the same figure."""
    doc = sample_docs(name)
    layers = {layer["name"]: layer for layer in doc["layers"]}
    gradient = [f for f in doc["findings"] if f["rule"] in GRADIENT_RULES]
    nonfinite = [f for f in doc["findings"] if f["rule"] in NONFINITE_RULES]
    summary = doc["summary"]
    t = Thresholds(vanishing_warning=summary["health_vanishing_warning"],
                   vanishing_error=summary["health_vanishing_error"],
                   exploding_warning=summary["health_exploding_warning"],
                   exploding_error=summary["health_exploding_error"])
    # Every finding's layer carries the class of its severity (or a worse one, from the
    # other figure), and the figure the finding judged is the layer's own.
    for f in gradient:
        layer = layers[f["location"]["node"]]
        wanted = _CLASS_OF[f["severity"]]
        assert layer["health_class"] in (wanted, "bad"), (f["rule"], layer["health_class"])
        figure = layer["health_measured" if f["rule"] in ("GS102", "GS202") else
                       "health_predicted"]
        assert math.isclose(figure, f["evidence"]["gradient_ratio"], rel_tol=1e-12), f
        own = classify(figure, t)
        if f["rule"] in ("GS101", "GS201") and "measured_ratio" in f["evidence"]:
            # a prediction stands as far as the measurement at the layer confirms it
            measured = classify(f["evidence"]["measured_ratio"], t)
            order = ["ok", "warn", "bad"]
            own = min(own, measured, key=order.index)  # type: ignore[arg-type]
        assert own == wanted, "the finding's severity is its (confirmed) figure's class"
    # Every layer shown warn/bad is covered by a finding of that direction and severity.
    for layer in doc["layers"]:
        cls = layer["health_class"]
        if cls in ("ok", None):
            if cls is None:
                assert layer["health_note"], f"{layer['name']}: not judged must say why"
            if cls == "ok":
                assert not [f for f in gradient if f["location"]["node"] == layer["name"]]
                assert classify(layer["health"], t) == "ok"
            continue
        if layer["nonfinite_forward"] or layer["nonfinite_backward"]:
            assert nonfinite, f"{layer['name']} is bad for non-finite values: GS501/GS502"
            continue
        assert classify(layer["health"], t) == cls, layer["name"]
        direction = "low" if layer["health"] < 1 else "high"
        covering = [f for f in gradient if _direction(f) == direction
                    and _RANK[f["severity"]] >= _RANK["error" if cls == "bad" else "warning"]]
        assert covering, f"{layer['name']} is {cls} but no rule says so"
    counts = {c: sum(1 for layer in doc["layers"] if layer["health_class"] == c)
              for c in ("ok", "warn", "bad", None)}
    assert (summary["health_ok"], summary["health_warn"], summary["health_bad"],
            summary["health_not_judged"]) == tuple(counts.values())


@pytest.mark.parametrize("name", SAMPLES)
def test_the_views_show_the_judged_classes(sample_docs: Any, name: str) -> None:
    """The HTML hierarchy and layer table colour each layer by its health class, nothing else."""
    from gradscope.render.graph_view import graph_view
    from gradscope.render.html import render_html

    doc = sample_docs(name)
    css = {"ok": "ok", "warn": "warn", "bad": "bad", None: "none"}
    expected = {layer["name"]: css[layer["health_class"]] for layer in doc["layers"]}
    view = graph_view(doc)
    assert view is not None
    leaves: dict[str, str] = {}

    def walk(children: list[dict[str, Any]]) -> None:
        for child in children:
            if child["kind"] == "layer":
                leaves[child["node"]] = child["css"]
            else:
                walk(child["children"])

    walk(view["children"])
    assert leaves == expected
    html = render_html(doc)
    cells = dict(re.findall(r'<tr data-name="([^"]*)"[^>]*>(?:<td>[^<]*</td>){6}'
                            r'<td class="health (\w+)"', html))
    assert cells == {k: v for k, v in expected.items()}


@pytest.mark.parametrize("name", SAMPLES)
def test_every_fix_snippet_compiles_and_names_every_target(sample_docs: Any, name: str) -> None:
    """Fixes applicable as they stand (issue 14): each snippet is complete Python, and the
    JSON lists every module or span a fix applies to, however the text shortens it."""
    for finding in sample_docs(name)["findings"]:
        for rec in finding["recommendations"]:
            if rec["code"]:
                compile(rec["code"], f"<{finding['rule']} {rec['kind']}>", "exec")
                assert "more" not in rec["code"] or "..." not in rec["code"], rec["code"]
            count = re.search(r"(?:Add|the|of) (\d+) (?:identity skip|hidden|weight layers)",
                              rec["text"])
            if count and rec["kind"] in ("residual_connection", "normalization",
                                         "activation", "initialization"):
                assert len(rec["targets"]) == int(count.group(1)), (rec["text"], rec["targets"])
