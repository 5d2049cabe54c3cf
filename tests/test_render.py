"""Renderers and the report schema, driven by hand-built reports (no torch needed).

The hostile strings here stand in for what arbitrary user code can put in a
module path, a file name or an exception message; the HTML and terminal
outputs must show them as inert text.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import SAMPLES

from gradscope._io import atomic_write_text, ensure_parent_writable
from gradscope.errors import OutputError
from gradscope.render.html import render_html, write_html
from gradscope.render.json_report import render_json, write_json
from gradscope.render.sarif import build_sarif, render_sarif, write_sarif
from gradscope.render.terminal import clean, render_terminal
from gradscope.report import (
    Finding,
    Layer,
    Location,
    ModelInfo,
    ProbeInfo,
    Recommendation,
    Report,
    TraceAttempt,
    TraceInfo,
    Verification,
)
from gradscope.rules.registry import RULES, iter_rules
from gradscope.schema import load_schema, validate_report

REPO = Path(__file__).resolve().parents[1]

XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "</script><script>alert(1)</script>"
ANSI_NAME = "enc\x1b[31mred\x1b]0;title\x07.fc\nFAKE HEALTHY"


# ------------------------------------------------------------------ fixtures


def _trace(**kw: Any) -> TraceInfo:
    defaults: dict[str, Any] = {
        "method": "fx",
        "ok": True,
        "message": None,
        "attempts": (TraceAttempt("fx", True),),
        "num_nodes": 4,
        "coverage": 1.0,
    }
    defaults.update(kw)
    return TraceInfo(**defaults)


def healthy_report() -> Report:
    layers = [
        Layer(
            name=f"fc{i}",
            op="Linear",
            depth=i,
            module=f"layers.{i}",
            module_class="Linear",
            kind="call_module",
            shape=(8, 64),
            dtype="float32",
            num_params=4160,
            file="/src/model.py",
            line=10 + i,
            static_grad_rms=1.0 - 0.01 * i,
            probe_grad_rms=1.02 - 0.01 * i,
            health_predicted=1.0 - 0.01 * i,
            health_measured=1.02 - 0.01 * i,
            health=1.02 if i == 0 else 1.02 - 0.01 * i,
            health_source="measured",
            health_class="ok" if i == 0 else None,
            param_grad_ratio=1.5e-3,
            dead_fraction=0.1 if i % 2 else None,
        )
        for i in range(4)
    ]
    return Report(
        model=ModelInfo(
            name="ReluMLP",
            num_parameters=16640,
            num_trainable_parameters=16640,
            device="cpu",
            trace=_trace(),
            output="logits",
            inputs=({"shape": [8, 64], "dtype": "float32"},),
        ),
        layers=layers,
        findings=[],
        probe=ProbeInfo(enabled=True, device="cpu", batch_size=8, loss="sum_of_squares", seed=0),
        summary={"static_ratio": 0.97, "probe_ratio": 0.99},
    )


def unhealthy_report(file: str = "/src/model.py") -> Report:
    """Findings of every severity, hostile names, NaN floats and a code recommendation."""
    layers = [
        Layer(name="x", op="placeholder", depth=0, kind="placeholder"),
        Layer(
            name="fc0",
            op="Linear",
            depth=1,
            module=XSS_IMG,
            file=file,
            line=12,
            num_params=100,
            static_grad_rms=2e-8,
            probe_grad_rms=float("nan"),
            health_predicted=2e-8,
            health_measured=float("nan"),
            health=2e-8,
            health_source="predicted",
            health_class="bad",
            health_note="judged predicted (GS101/GS201)",
            param_grad_ratio=float("inf"),
        ),
        Layer(
            name="act",
            op="sigmoid",
            depth=2,
            module=XSS_SCRIPT,
            static_grad_rms=1e-4,
            probe_grad_rms=3e-4,
            health_predicted=1e-4,
            health_measured=3e-4,
            saturated_fraction=0.75,
            understood=False,
        ),
        Layer(name="out", op="Linear", depth=3, module=ANSI_NAME, static_grad_rms=1.0,
              probe_grad_rms=1.0, health_predicted=1.0, health_measured=1.0),
    ]
    findings = [
        Finding(
            rule="GS801",
            category="trace",
            severity="info",
            message="fx failed; used the runtime tracer",
            location=Location(),
        ),
        Finding(
            rule="GS102",
            category="vanishing_gradient",
            severity="error",
            message=f"gradient at {XSS_IMG} is 2.00e-08 of the output's",
            location=Location(module=XSS_IMG, node="fc0", file=file, line=12),
            recommendations=(
                Recommendation(
                    "initialization",
                    "Use Kaiming init for ReLU layers",
                    "nn.init.kaiming_normal_(m.weight) if a < b && c > d else None",
                ),
                Recommendation("residual_connection", "Add a skip connection"),
            ),
            evidence={"ratio": 2e-8, "threshold": 1e-3, "where": XSS_SCRIPT},
        ),
        Finding(
            rule="GS802",
            category="trace",
            severity="warning",
            message="coverage 75%",
            location=Location(module=ANSI_NAME, node="out", file=None, line=None),
            recommendations=(Recommendation("activation", f"check {ANSI_NAME}"),),
        ),
    ]
    return Report(
        model=ModelInfo(
            name=f"Evil{XSS_SCRIPT}",
            num_parameters=200,
            device="cpu",
            trace=_trace(
                method="runtime",
                message="fx failed",
                attempts=(TraceAttempt("fx", False, f"boom {XSS_IMG}"),
                          TraceAttempt("runtime", True)),
                coverage=0.75,
                unknown_ops=("weird_op",),
            ),
        ),
        layers=layers,
        findings=findings,
        probe=ProbeInfo(enabled=True, device="cpu", batch_size=4, output_grad_rms=float("nan")),
        summary={"worst_probe_ratio": float("nan")},
        notes=["shape inferred from the first layer"],
    )


def no_probe_report() -> Report:
    """Static analysis only and no static figures either: the profile has nothing to draw."""
    return Report(
        model=ModelInfo(name="Tiny", num_parameters=0, device="cpu", trace=_trace()),
        layers=[Layer(name="x", op="placeholder", depth=0)],
        findings=[],
        probe=ProbeInfo(enabled=False),
    )


ALL_REPORTS = {"healthy": healthy_report, "unhealthy": unhealthy_report, "noprobe": no_probe_report}


@pytest.fixture(params=sorted(ALL_REPORTS))
def any_doc(request: pytest.FixtureRequest) -> dict[str, Any]:
    return ALL_REPORTS[request.param]().to_dict()


# ---------------------------------------------------------------- JSON + schema


def test_json_round_trips_and_validates(any_doc: dict[str, Any]) -> None:
    text = render_json(any_doc)
    assert text.endswith("}\n")
    assert json.loads(text) == any_doc
    assert render_json(copy.deepcopy(any_doc)) == text  # deterministic
    assert list(json.loads(text)) == list(any_doc)  # key order kept, not sorted
    validate_report(json.loads(text))


def test_unhealthy_status_and_nonfinite_become_null_with_notes() -> None:
    doc = unhealthy_report().to_dict()
    assert doc["status"] == "unhealthy"
    fc0 = doc["layers"][1]
    assert fc0["probe_grad_rms"] is None and fc0["param_grad_ratio"] is None
    assert doc["probe"]["output_grad_rms"] is None
    assert doc["summary"]["worst_probe_ratio"] is None
    joined = "\n".join(doc["notes"])
    assert "layers[1].probe_grad_rms" in joined and "layers[1].param_grad_ratio" in joined
    assert "shape inferred from the first layer" in joined
    text = render_json(doc)
    assert "NaN" not in text and "Infinity" not in text


def test_render_json_refuses_raw_nan() -> None:
    doc = healthy_report().to_dict()
    doc["layers"][0]["static_grad_rms"] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        render_json(doc)


def test_write_json_file_and_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = unhealthy_report().to_dict()
    target = tmp_path / "report.json"
    write_json(doc, target)
    assert json.loads(target.read_text(encoding="utf-8")) == doc
    write_json(doc, "-")
    assert json.loads(capsys.readouterr().out) == doc


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    schema["title"] = "changed"
    assert load_schema()["title"] != "changed"  # callers get their own copy


def _delete(doc: dict[str, Any], path: tuple[Any, ...]) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


CONTRACT_PATHS = [
    ("schema_version",),
    ("gradscope_version",),
    ("status",),
    ("model",),
    ("layers",),
    ("findings",),
    ("model", "name"),
    ("model", "num_parameters"),
    ("model", "device"),
    ("model", "trace"),
    ("model", "trace", "method"),
    ("model", "trace", "ok"),
    ("model", "trace", "message"),
    *[("layers", 1, key) for key in (
        "name", "module", "op", "depth", "static_grad_rms", "probe_grad_rms",
        "param_grad_ratio", "dead_fraction", "saturated_fraction")],
    *[("findings", 1, key) for key in (
        "rule", "category", "severity", "message", "location", "recommendations")],
    *[("findings", 1, "location", key) for key in ("module", "node", "file", "line")],
    *[("findings", 1, "recommendations", 0, key) for key in ("kind", "text", "code")],
]


@pytest.mark.parametrize("path", CONTRACT_PATHS, ids=lambda p: ".".join(map(str, p)))
def test_missing_contract_field_fails_validation(path: tuple[Any, ...]) -> None:
    doc = unhealthy_report().to_dict()
    validate_report(doc)
    _delete(doc, path)
    with pytest.raises(ValueError, match="does not match"):
        validate_report(doc)


BAD_VALUES = [
    (("schema_version",), 2),
    (("status",), "sick"),
    (("findings", 1, "severity"), "fatal"),
    (("findings", 1, "category"), "vibes"),
    (("findings", 1, "recommendations", 0, "kind"), "pray"),
    (("findings", 1, "rule"), "XX101"),
    (("layers", 1, "depth"), "1"),
    (("layers", 1, "static_grad_rms"), "2e-8"),
    (("layers", 1, "op"), None),
    (("model", "num_parameters"), 1.5),
    (("model", "trace", "ok"), "yes"),
    (("findings", 1, "location", "line"), "12"),
    (("findings", 1, "recommendations", 0, "code"), 3),
]


@pytest.mark.parametrize("path,value", BAD_VALUES, ids=lambda x: str(x))
def test_bad_type_or_enum_fails_validation(path: tuple[Any, ...], value: Any) -> None:
    doc = unhealthy_report().to_dict()
    _set(doc, path, value)
    with pytest.raises(ValueError, match="does not match"):
        validate_report(doc)


def test_status_must_agree_with_findings() -> None:
    doc = unhealthy_report().to_dict()
    doc["status"] = "healthy"
    with pytest.raises(ValueError, match=r"\$\.status"):
        validate_report(doc)
    healthy = healthy_report().to_dict()
    healthy["status"] = "warning"
    with pytest.raises(ValueError):
        validate_report(healthy)


def test_validation_lists_every_violation() -> None:
    doc = unhealthy_report().to_dict()
    doc["layers"][2]["depth"] = "deep"
    doc["findings"][0]["severity"] = "fatal"
    with pytest.raises(ValueError) as info:
        validate_report(doc)
    text = str(info.value)
    assert "$.layers[2].depth" in text and "$.findings[0].severity" in text


def test_unknown_fields_are_allowed_for_forward_compatibility() -> None:
    doc = unhealthy_report().to_dict()
    doc["future"] = {"anything": [1, 2]}
    doc["model"]["gpu_name"] = "H100"
    doc["layers"][0]["flops"] = 123
    doc["findings"][0]["location"]["column"] = 4
    doc["findings"][0]["recommendations"] = [{"kind": "warmup", "text": "t", "code": None, "x": 1}]
    validate_report(doc)


def test_optional_extras_are_type_checked_when_present() -> None:
    doc = healthy_report().to_dict()
    doc["layers"][0]["shape"] = "8x64"
    doc["model"]["trace"]["attempts"] = [{"method": "fx"}]
    with pytest.raises(ValueError) as info:
        validate_report(doc)
    assert "shape" in str(info.value) and "attempts" in str(info.value)


def test_contract_only_document_validates() -> None:
    """A producer that writes nothing beyond docs/contract.md section 4 is still valid."""
    doc = {
        "schema_version": 1,
        "gradscope_version": "9.9",
        "status": "warning",
        "model": {"name": "m", "num_parameters": 1, "device": "cpu",
                  "trace": {"method": "fx", "ok": True, "message": None}},
        "layers": [{"name": "a", "module": None, "op": "relu", "depth": 0,
                    "static_grad_rms": None, "probe_grad_rms": 0.5, "param_grad_ratio": None,
                    "dead_fraction": 0.0, "saturated_fraction": None}],
        "findings": [{"rule": "GS802", "category": "trace", "severity": "warning", "message": "m",
                      "location": {"module": None, "node": None, "file": None, "line": None},
                      "recommendations": []}],
    }
    validate_report(doc)
    # ...and every renderer copes with the missing extras.
    assert "<table class=\"layers\">" in render_html(doc)
    assert "GS802" in render_terminal(doc, color=False)
    assert json.loads(render_sarif(doc))["runs"][0]["results"][0]["ruleId"] == "GS802"


# ---------------------------------------------------------------------- HTML


class _Structure(HTMLParser):
    """Checks that non-void elements nest and close: a cheap stand-in for a validator."""

    VOID: ClassVar[frozenset[str]] = frozenset({
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"})
    SELF_CLOSING_OK: ClassVar[frozenset[str]] = frozenset(
        {"line", "path", "circle", "rect", "polyline"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID | self.SELF_CLOSING_OK:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def _parse(html: str) -> _Structure:
    parser = _Structure()
    parser.feed(html)
    parser.close()
    return parser


def test_html_is_well_formed_and_deterministic(any_doc: dict[str, Any]) -> None:
    html = render_html(any_doc)
    assert html.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in html
    parser = _parse(html)
    assert parser.errors == []
    assert parser.stack == []
    assert render_html(copy.deepcopy(any_doc)) == html


def test_html_escapes_hostile_strings() -> None:
    doc = unhealthy_report().to_dict()
    html = render_html(doc)
    for raw in (XSS_IMG, XSS_SCRIPT, "<script>alert", "<img src=x"):
        assert raw not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &lt; b &amp;&amp; c &gt; d" in html  # recommendation code, escaped in <pre><code>
    parser = _parse(html)
    scripts = [a for t, a in parser.tags if t == "script"]
    # One data block; every other script is the template's own code (no attributes, no src).
    data_block = {"type": "application/json", "id": "gradscope-report"}
    assert [a for a in scripts if a].count(data_block) == 1
    assert all(a == {} or a.get("type") == "application/json" for a in scripts)
    assert [t for t, _ in parser.tags].count("img") == 0
    assert not any(k.startswith("on") for _, attrs in parser.tags for k in attrs)
    # The embedded JSON is inert (no '<') yet parses back to the report.
    payload = html.split('<script type="application/json" id="gradscope-report">', 1)[1]
    payload = payload.split("</script>", 1)[0]
    assert "<" not in payload and ">" not in payload and "&" not in payload
    assert json.loads(payload) == doc


def test_html_makes_no_external_requests(any_doc: dict[str, Any]) -> None:
    html = render_html(any_doc)
    external = re.compile(
        r"""(?:\b(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:https?:)?//)"""
        r"""|url\(\s*["']?\s*(?:https?:)?//|@import""",
        re.IGNORECASE,
    )
    assert not external.search(html)
    parser = _parse(html)
    assert not [t for t, _ in parser.tags if t in {"link", "img", "iframe", "object", "embed"}]
    assert "default-src 'none'" in html  # CSP as a second line of defence


def test_html_layer_table_has_a_row_per_layer(any_doc: dict[str, Any]) -> None:
    html = render_html(any_doc)
    tbody = html.split('<table class="layers">', 1)[1].split("</tbody>", 1)[0]
    assert tbody.count("<tr") == len(any_doc["layers"]) + 1  # + header row


def test_html_shows_findings_numbers_and_facts() -> None:
    html = render_html(unhealthy_report().to_dict())
    assert "Unhealthy" in html and 'class="banner unhealthy"' in html
    errors = html.index("Errors (1)")
    warnings = html.index("Warnings (1)")
    assert errors < warnings < html.index("Info (1)")
    assert "GS102" in html and "Use Kaiming init for ReLU layers" in html
    assert re.search(r'<pre id="fix-\d+"><code>nn\.init\.kaiming_normal_', html)
    assert "2.00e-08" in html  # numbers formatted like 1.23e-04
    assert "model.py:12" in html
    assert "boom &lt;img" in html  # failed trace attempt with its message
    assert "weird_op" in html and "75.0%" in html
    assert "shape inferred from the first layer" in html
    assert "<svg" in html and 'class="probe-point"' in html and 'class="static-line"' in html


def test_html_profile_handles_all_null_and_healthy() -> None:
    html = render_html(no_probe_report().to_dict())
    assert "No gradient figures to plot" in html
    assert "<svg" not in html
    assert "disabled (static analysis only)" in html
    healthy = render_html(healthy_report().to_dict())
    assert "Healthy" in healthy and "No findings" in healthy
    assert healthy.count('class="probe-point"') == 4


def test_html_without_probe_section_renders() -> None:
    doc = healthy_report().to_dict()
    del doc["probe"], doc["summary"], doc["notes"]
    html = render_html(doc)
    assert "not recorded" in html


def test_write_html(tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    doc = healthy_report().to_dict()
    write_html(doc, target)
    assert target.read_text(encoding="utf-8") == render_html(doc)
    assert os.listdir(tmp_path) == ["r.html"]


def _interactive_doc() -> dict[str, Any]:
    """The unhealthy report plus a verified fix, probe spread and update ratios."""
    doc = unhealthy_report().to_dict()
    rec = doc["findings"][1]["recommendations"][0]
    rec["verified"] = Verification("input-grad ratio", 2e-8, 0.41).to_dict()
    for i, layer in enumerate(doc["layers"][1:], start=1):
        layer["probe_grad_rms"] = 10.0 ** -i
        layer["health_measured"] = 10.0 ** -i
        layer["probe_grad_rms_min"] = 0.5 * 10.0 ** -i
        layer["probe_grad_rms_max"] = 2.0 * 10.0 ** -i
    doc["layers"][1]["update_ratio"] = 3e-3
    doc["layers"][3]["update_ratio"] = 0.2
    return doc


def test_html_copy_buttons_match_code_blocks() -> None:
    html = render_html(_interactive_doc())
    parser = _parse(html)
    assert parser.errors == []
    targets = [a["data-copy-target"] for t, a in parser.tags
               if t == "button" and "copy" in (a.get("class") or "").split()]
    code_ids = [a["id"] for t, a in parser.tags if t == "pre" and a.get("id")]
    assert targets and targets == code_ids  # one button per code block, ids unique
    assert len(set(code_ids)) == len(code_ids)
    assert all(a.get("type") == "button" for t, a in parser.tags if t == "button")
    assert 'data-copy-target="fix-1">Copy</button><pre id="fix-1"><code>' in html
    assert "navigator.clipboard.writeText" in html and "execCommand(\"copy\")" in html
    assert ">Copied" not in html  # feedback is set by the script, not rendered


def test_html_verified_badge() -> None:
    html = render_html(_interactive_doc())
    assert '<span class="verified"' in html
    assert "verified: 2.00e-08 \u2192 4.10e-01 (input-grad ratio)</span>" in html
    assert html.count('class="verified"') == 1  # only the recommendation that has figures
    plain = render_html(unhealthy_report().to_dict())
    assert 'class="verified"' not in plain


def test_html_layer_table_sort_and_filter_hooks() -> None:
    doc = _interactive_doc()
    html = render_html(doc)
    parser = _parse(html)
    keys = [a["data-key"] for t, a in parser.tags
            if t == "button" and "sort" in (a.get("class") or "").split()]
    assert {"i", "name", "module", "op", "static", "probe", "update", "params"} <= set(keys)
    head = html.split('<table class="layers">', 1)[1].split("</thead>", 1)[0]
    assert len(re.findall(r"<th[ >]", head)) == head.count('<button class="sort"') == len(keys)
    inputs = [a for t, a in parser.tags if t == "input"]
    assert inputs == [{"id": "layer-filter", "type": "search",
                       "placeholder": "filter by name, module or op",
                       "aria-label": "filter layers by name, module or op", "autocomplete": "off"}]
    count = f'<span id="layer-count" class="muted" aria-live="polite">{len(doc["layers"])} of'
    assert count in html
    rows = [a for t, a in parser.tags if t == "tr" and "data-name" in a]
    assert [r["data-name"] for r in rows] == [layer["name"] for layer in doc["layers"]]
    assert rows[1]["data-i"] == "1" and rows[1]["data-update"] == "0.003"
    assert rows[1]["data-probe"] == "0.1" and rows[1]["data-params"] == "100"
    assert "data-static" not in rows[0]  # null values leave the attribute out: they sort last
    # No update column without update ratios.
    assert 'data-key="update"' not in render_html(healthy_report().to_dict())


def test_html_probe_spread_and_update_chart() -> None:
    html = render_html(_interactive_doc())
    assert html.count('<line class="spread"') == 3
    assert "spread across probe batches" in html
    assert 'id="update-ratio"' in html and '<rect class="band"' in html
    assert html.count('<circle class="update-point"') == 1
    assert html.count('<circle class="update-point off"') == 1
    assert "healthy band 1.00e-04 \u2013 1.00e-02" in html
    healthy = render_html(healthy_report().to_dict())
    assert 'class="spread"' not in healthy  # one probe batch: no spread
    assert 'id="update-ratio"' not in healthy and 'class="band"' not in healthy


def test_html_scripts_pinned_by_csp_hash() -> None:
    import base64
    import hashlib

    html = render_html(_interactive_doc())
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html)
    assert csp
    policy = csp.group(1)
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]
    bodies = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert bodies
    for body in bodies:
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
        assert "innerHTML" not in body and "http" not in body


def test_html_interactive_doc_stays_safe_and_offline() -> None:
    doc = _interactive_doc()
    doc["findings"][1]["recommendations"][0]["verified"]["metric"] = XSS_SCRIPT
    html = render_html(doc)
    for needle in ('src="http', "href=\"http", "@import", "url(http", XSS_IMG, XSS_SCRIPT):
        assert needle not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "\\u003c/script\\u003e" in html  # inside the JSON block
    assert "(&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;)" in html  # in the badge
    assert _parse(html).errors == []


def test_html_run_facts_cover_probe_settings_and_versions() -> None:
    doc = healthy_report().to_dict()
    doc["probe"].update(batches=3, lr=1e-3, optimizer="adam", mode="train")
    doc["torch_version"] = "2.5.1"
    html = render_html(doc)
    for text in ("batches: 3", "batch size: 8", "loss: sum_of_squares", "mode: train",
                 "optimizer: adam", "lr: 1.00e-03", "Op coverage", "100.0% of 4 nodes",
                 "Trace method", "Parameters", "16,640", "gradscope version",
                 "PyTorch version</dt>", "2.5.1"):
        assert text in html, text


def test_html_size_stays_small_for_large_models() -> None:
    base = healthy_report().to_dict()
    template = base["layers"][1]
    layers = []
    for i in range(2000):
        layer = dict(template, name=f"transformer_h_{i // 16}_attn_c_attn_{i}",
                     module=f"transformer.h.{i // 16}.attn.c_attn", depth=i, line=100 + i,
                     file="/site-packages/transformers/models/gpt2/modeling_gpt2.py")
        layer.update(static_grad_rms=1.0 / (1 + i), probe_grad_rms=1.1 / (1 + i),
                     health_predicted=1.0 / (1 + i), health_measured=1.1 / (1 + i),
                     probe_grad_rms_min=0.9 / (1 + i), probe_grad_rms_max=1.3 / (1 + i),
                     update_ratio=1e-3 * (1 + i % 7), param_grad_norm=0.1)
        layers.append(layer)
    base["layers"] = layers
    html = render_html(base)
    # The table and the charts stay lean per layer (points become one path each).
    table = html.split('<table class="layers">', 1)[1].split("</table>", 1)[0]
    charts = "".join(re.findall(r"<svg class=\"profile.*?</svg>", html, re.DOTALL))
    assert len(table.encode()) / len(layers) < 600
    assert len(charts.encode()) < 150_000 and "<title>" not in charts
    assert html.count("modeling_gpt2.py:") >= len(layers)  # short file names in the table
    page = html.split('<script type="application/json"', 1)[0]
    assert page.count("/site-packages/transformers/models/gpt2/modeling_gpt2.py") == 1  # legend
    # A GPT-2-medium-sized model (~1,200 layers), embedded JSON included, stays under 2 MB.
    base["layers"] = layers[:1200]
    assert len(render_html(base).encode("utf-8")) < 2_000_000


# ------------------------------------------------------------------ terminal


def test_terminal_strips_control_sequences_from_model_strings() -> None:
    doc = unhealthy_report().to_dict()
    plain = render_terminal(doc, color=False)
    assert "\x1b" not in plain and "\x07" not in plain
    assert "encred.fc FAKE HEALTHY" in plain
    # The only newlines are ours: no line starts with the injected text.
    assert not any(line.startswith("FAKE") for line in plain.splitlines())

    colored = render_terminal(doc, color=True)
    assert "\x1b]" not in colored and "\x07" not in colored
    own_codes = re.compile(r"\x1b\[(?:0|1|2|31|32|33|36)m")
    assert "\x1b" not in own_codes.sub("", colored)
    assert "encred.fc FAKE HEALTHY" in own_codes.sub("", colored)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("a\x1b[31mb", "ab"),
        ("a\x1b[2Jb", "ab"),
        ("a\x1b]8;;file:///x\x1b\\b", "ab"),
        ("a\nb\r\nc\td", "a b c d"),
        ("a\x00b\x7fc\x9fd", "abcd"),
        ("x\x9b31my", "xy"),  # 8-bit CSI
        ("x\x1b", "x"),
        ("abc\u202edef", "abcdef"),
        (None, ""),
    ],
)
def test_clean(raw: Any, expected: str) -> None:
    assert clean(raw) == expected


def test_terminal_layout_and_order() -> None:
    out = render_terminal(unhealthy_report().to_dict(), color=False, width=1000)
    lines = out.splitlines()
    assert lines[0].startswith("gradscope Evil") and lines[0].endswith("UNHEALTHY")
    body = "\n".join(lines)
    for label in ("parameters", "trace", "probe", "findings"):
        assert re.search(rf"^  {label}\s", body, re.MULTILINE), label
    assert "runtime (" not in lines[2]
    assert "coverage 75%" in body
    assert "1 error, 1 warning, 1 info" in body
    finding_lines = [ln for ln in lines if re.match(r"^(ERROR|WARNING|INFO)\s+GS\d{3} ", ln)]
    assert [ln.split()[0] for ln in finding_lines] == ["ERROR", "WARNING", "INFO"]
    err = lines.index(finding_lines[0])
    assert "model.py:12" in finding_lines[0]
    assert lines[err + 1] == "    fix 1: Use Kaiming init for ReLU layers"  # every fix, numbered
    assert finding_lines[2].startswith("INFO    GS801 <model>: ")
    assert not out.endswith("\n\n")


def test_terminal_healthy_and_no_probe() -> None:
    out = render_terminal(healthy_report().to_dict(), color=False)
    assert out.splitlines()[0] == "gradscope ReluMLP: HEALTHY"
    assert "static ratio" in out and "9.70e-01" in out
    assert "0 error, 0 warning, 0 info" in out
    colored = render_terminal(healthy_report().to_dict(), color=True)
    assert "\x1b[32m" in colored  # green verdict
    off = render_terminal(no_probe_report().to_dict(), color=False)
    assert "off (static analysis only)" in off


def test_terminal_relative_paths_under_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    doc = unhealthy_report(file=str(tmp_path / "pkg" / "model.py")).to_dict()
    out = render_terminal(doc, color=False)
    assert f"{Path('pkg/model.py')}:12" in out and str(tmp_path) not in out


# --------------------------------------------------------------------- SARIF


def test_sarif_structure_rules_and_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    doc = unhealthy_report(file=str(tmp_path / "src" / "my model.py")).to_dict()
    text = render_sarif(doc)
    assert text == render_sarif(copy.deepcopy(doc))
    log = json.loads(text)
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert log["version"] == "2.1.0"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "gradscope" and driver["version"] == doc["gradscope_version"]
    assert "informationUri" not in driver
    rules = driver["rules"]
    assert [r["id"] for r in rules] == [r.code for r in iter_rules()] == sorted(RULES)
    levels = {"error": "error", "warning": "warning", "info": "note"}
    for entry in rules:
        rule = RULES[entry["id"]]
        assert entry["name"] == rule.name
        assert entry["shortDescription"]["text"] == rule.summary
        assert entry["fullDescription"]["text"] == rule.what
        assert entry["help"]["text"] == rule.fix
        assert entry["properties"]["category"] == rule.category
        assert entry["defaultConfiguration"]["level"] == levels[rule.severity]

    results = run["results"]
    assert len(results) == len(doc["findings"])
    for result, finding in zip(results, doc["findings"], strict=True):
        assert result["ruleId"] == finding["rule"]
        assert rules[result["ruleIndex"]]["id"] == finding["rule"]
        assert result["level"] == levels[finding["severity"]]
        assert result["message"]["text"].startswith(finding["message"])

    info, error, warning = results
    assert "locations" not in info  # no file, no module
    (loc,) = error["locations"]
    phys = loc["physicalLocation"]
    assert phys["artifactLocation"]["uri"] == "src/my%20model.py"
    assert phys["region"] == {"startLine": 12}
    assert loc["logicalLocations"] == [{"fullyQualifiedName": XSS_IMG, "kind": "module"}]
    assert error["message"]["text"].endswith("Fix: Use Kaiming init for ReLU layers")
    (wloc,) = warning["locations"]
    assert "physicalLocation" not in wloc  # file is null
    assert wloc["logicalLocations"][0]["kind"] == "module"


def test_sarif_absolute_uri_outside_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inside = tmp_path / "work"
    inside.mkdir()
    monkeypatch.chdir(inside)
    outside = tmp_path / "elsewhere" / "m.py"
    log = build_sarif(unhealthy_report(file=str(outside)).to_dict())
    uri = log["runs"][0]["results"][1]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert uri["uri"] == outside.resolve().as_uri()
    assert "uriBaseId" not in uri


def test_sarif_without_line_has_no_region(tmp_path: Path) -> None:
    report = unhealthy_report(file=str(tmp_path / "m.py"))
    finding = report.findings[1]
    report.findings[1] = Finding(
        rule=finding.rule, category=finding.category, severity=finding.severity,
        message=finding.message, location=Location(module="m", file=finding.location.file),
    )
    result = build_sarif(report.to_dict())["runs"][0]["results"][1]
    assert "region" not in result["locations"][0]["physicalLocation"]


def test_write_sarif(tmp_path: Path) -> None:
    target = tmp_path / "out.sarif"
    write_sarif(healthy_report().to_dict(), target)
    assert json.loads(target.read_text(encoding="utf-8"))["runs"][0]["results"] == []


# ------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "report.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second\u00e9")
    assert target.read_text(encoding="utf-8") == "second\u00e9"
    assert os.listdir(tmp_path) == ["report.txt"]


def test_atomic_write_into_a_file_raises_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        atomic_write_text(blocker / "report.html", "x")
    message = info.value.one_line()
    assert str(blocker / "report.html") in message and "--html" in message
    assert "\n" not in message
    with pytest.raises(OutputError):
        ensure_parent_writable(blocker / "report.html")


def test_failed_replace_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # os.replace of a file over a directory fails, even for root
    with pytest.raises(OutputError):
        atomic_write_text(target, "x")
    assert os.listdir(tmp_path) == ["taken"]
    with pytest.raises(OutputError, match="is a directory"):
        ensure_parent_writable(target)


def test_ensure_parent_writable(tmp_path: Path) -> None:
    ensure_parent_writable(tmp_path / "new.json")
    ensure_parent_writable("-")
    with pytest.raises(OutputError, match="does not exist"):
        ensure_parent_writable(tmp_path / "missing" / "r.json")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            ensure_parent_writable(ro / "r.json")
        with pytest.raises(OutputError):
            atomic_write_text(ro / "r.json", "x")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------ imports


def test_renderers_do_not_import_torch() -> None:
    code = (
        "import gradscope.render.html, gradscope.render.terminal, gradscope.render.sarif, "
        "gradscope.render.json_report, gradscope.schema, gradscope._io, sys; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_terminal_prints_notes_up_to_a_limit() -> None:
    from gradscope.render.terminal import NOTES_SHOWN

    doc = healthy_report().to_dict()
    doc["notes"] = ["2 findings suppressed by select/ignore/per-module-ignore (GS101, GS102)"]
    out = render_terminal(doc, color=False)
    assert out.splitlines()[-1] == ("note: 2 findings suppressed by select/ignore/"
                                    "per-module-ignore (GS101, GS102)")
    doc["notes"] = [f"note {i}" for i in range(NOTES_SHOWN + 3)]
    lines = render_terminal(doc, color=False).splitlines()
    assert lines[-1] == "note: ... and 3 more in the JSON/HTML report"
    assert sum(1 for ln in lines if ln.startswith("note: note ")) == NOTES_SHOWN


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("width", [80, 60])
def test_terminal_fits_the_width_on_every_sample(sample_report: Any, name: str,
                                                 width: int) -> None:
    """No line over the width, coloured or not (issue 16: 290-505 character lines)."""
    doc = sample_report(name).doc
    for color in (False, True):
        out = render_terminal(doc, color=color, width=width)
        visible = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.splitlines()]
        assert max(len(line) for line in visible) <= width, \
            max(visible, key=len)
    # nothing is lost to the wrapping: every finding's message is there, word for word
    flat = " ".join(render_terminal(doc, color=False, width=width).split())
    for finding in doc["findings"]:
        assert " ".join(clean(finding["message"]).split()) in flat


def test_terminal_prints_every_fix_and_a_shared_one_once(sample_report: Any) -> None:
    doc = sample_report("deep_sigmoid_mlp").doc
    out = " ".join(render_terminal(doc, color=False, width=80).split())
    texts = [rec["text"] for f in doc["findings"] for rec in f["recommendations"]]
    assert len(texts) > len(set(texts)), "the sample shares fixes between findings"
    for text in set(texts):
        assert out.count(" ".join(clean(text).split())) == 1, text  # printed once...
    assert "the same as fix [1] above." in out  # ...and referred to after that
    gs101 = next(f for f in doc["findings"] if f["rule"] == "GS101")
    assert len(gs101["recommendations"]) >= 2 and "fix 2:" in out


def test_cli_wraps_to_columns(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "70"}
    proc = subprocess.run([sys.executable, "-m", "gradscope", "analyze",
                           str(REPO / "sample_models" / "deep_sigmoid_mlp.py"), "--no-probe"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 70


def test_module_rows_fold_ops_under_their_modules(sample_report: Any) -> None:
    """The main table: the nn.Module hierarchy in execution order, containers named by
    their class (from model.modules), a module's own ops folded under it, a module kept
    whole standing for its one node."""
    from gradscope.render.html import module_rows

    doc = sample_report("post_ln_transformer").doc
    rows = module_rows(doc["layers"], doc["findings"], None, doc["model"]["modules"])
    by_path = {r["path"]: r for r in rows}
    assert by_path["encoder"]["class"] == "TransformerEncoder"
    assert by_path["encoder.layers.0"]["class"] == "TransformerEncoderLayer"
    attn = by_path["encoder.layers.0.self_attn"]
    assert attn["class"] == "MultiheadAttention" and attn["ops"] == []  # kept whole
    assert by_path["encoder.layers.0"]["indent"] == 2 and by_path["encoder"]["indent"] == 0
    # execution order: a parent before its children, the embedding before the encoder
    paths = [r["path"] for r in rows]
    assert paths.index("embed") < paths.index("encoder") < paths.index("encoder.layers.0") \
        < paths.index("encoder.layers.0.self_attn")
    # every graph node but inputs and weights is either a module row or an op under one
    nodes = {la["name"] for la in doc["layers"] if la["op"] not in ("input", "parameter")}
    whole = {la["name"] for la in doc["layers"] if la.get("module_class")
             and by_path.get(la["module"], {}).get("ops") == []}
    folded = {doc["layers"][i]["name"] for r in rows for i in r["ops"]}
    assert nodes == whole | folded, nodes - (whole | folded)
    # a container's parameters are its layers' (each weight counted where it is used)
    layer0 = [la for la in doc["layers"] if (la.get("module") or "").startswith(
        "encoder.layers.0.") and la["op"] not in ("input", "parameter")]
    assert by_path["encoder.layers.0"]["params"] == f"{sum(la['num_params'] for la in layer0):,}"


def test_weight_gradient_chart_has_a_bar_per_weight_layer(sample_report: Any) -> None:
    """||grad W|| per weight layer in network order, labelled by module, the measured
    figures of the layer table (the plot_grad_flow chart)."""
    from gradscope.render.html import weight_grad_chart

    doc = sample_report("deep_sigmoid_mlp").doc
    chart = weight_grad_chart(doc["layers"])
    assert chart is not None
    weighted = [la for la in doc["layers"] if (la.get("param_grad_norm") or 0) > 0]
    assert chart["count"] == len(weighted) == len(chart["bars"])
    xs = [float(b["x"]) for b in chart["bars"]]
    assert xs == sorted(xs)  # network order, first layer on the left
    ys = [float(b["y"]) for b in chart["bars"]]
    # the vanishing sample: the first layer's bar is the shortest (largest y), the last
    # layer's the tallest, as the measured norms say
    assert ys[0] == max(ys) and ys[-1] == min(ys)
    assert [lab["label"] for lab in chart["labels"]] == [
        str(la.get("module") or la["name"]) for la in weighted]
    html = render_html(doc)
    assert '<svg class="profile grads"' in html and html.count('class="grad-bar"') == len(weighted)
    assert weight_grad_chart([{"name": "x", "param_grad_norm": None}]) is None


def test_depth_profile_marks_the_modules(sample_report: Any) -> None:
    """The profile is indexed by node; spans along the top say which module each stretch
    is: top-level modules, a span over a quarter of the layers split into its children
    (through a one-child container such as encoder.layers)."""
    from gradscope.render.html import module_spans

    doc = sample_report("post_ln_transformer").doc
    spans = module_spans(doc["layers"])
    assert [label for _, _, label in spans] == [
        "embed", "layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "layers.5",
        "head"]
    firsts = [a for a, _, _ in spans]
    assert firsts == sorted(firsts)
    for a, b, label in spans:  # each span's layers are that module's (or its parent's ops)
        block = label.split(".")[-1]
        for layer in doc["layers"][a:b + 1]:
            assert block in (layer.get("module") or "").split(".") or \
                layer.get("module") in ("encoder", "encoder.layers"), (label, layer)
    html = render_html(doc)
    assert html.count('<rect class="span') == len(spans)  # each with its title
    labels = re.findall(r'class="span-label"[^>]*>([^<]*)<', html)
    assert [f"layers.{k}" for k in range(6)] == labels  # where a label fits
    assert module_spans([{"module": "a"}, {"module": "a.b"}]) == []  # one span: none


def test_recurrent_layer_gets_a_gradient_per_time_step_chart(sample_report: Any) -> None:
    """The LSTM sample (forget bias 0, 100 steps): its predicted input gradient per step,
    relative to the largest, as the JSON's time_profile, drawn step by step."""
    from gradscope.render.html import time_charts

    doc = sample_report("lstm").doc
    rnn = [la for la in doc["layers"] if la.get("time_profile")]
    assert len(rnn) == 1
    profile = rnn[0]["time_profile"]
    assert len(profile) == 100 and max(profile) == pytest.approx(1.0)
    # the gradient fades towards the first step (ground truth: 4.7e-21 measured at t=0,
    # tests/test_sample_models_ground_truth.py)
    assert profile[0] < 1e-18 and profile[-1] == pytest.approx(1.0)
    charts = time_charts(doc["layers"])
    assert len(charts) == 1 and charts[0]["steps"] == 100
    assert charts[0]["path"].count("L") == 99
    html = render_html(doc)
    assert html.count('<svg class="profile time"') == 1 and "Gradient per time step" in html
    # layers that are not recurrent carry no profile
    assert all(la.get("time_profile") is None for la in doc["layers"] if la is not rnn[0])
