"""One hostile report through every renderer: strings from the model stay text everywhere.

Module names, file paths and messages come from the user's code (or from a
model someone sent them). Each renderer has its own escaping tests; this one
feeds the same worst-case strings (markup, quotes, CR/LF, ANSI and OSC
sequences, ``%`` and ``::`` for GitHub's workflow commands, bidi controls and a
20,000-character name) to all of them at once, from a real ``analyze`` run
whose model carries those names, so a renderer added later is held to it too.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

import gradscope
from gradscope.render.github import render_github
from gradscope.render.html import render_html
from gradscope.render.sarif import render_sarif
from gradscope.render.terminal import render_terminal
from gradscope.schema import validate_report

#: ModuleDict keys may hold anything but "." (and must not be empty).
HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(2)</script>",
    "quote'\"`and&amp;",
    "line\nbreak\rreturn",
    "ansi\x1b[31mred\x1b]0;title\x07end",
    "gh%0A::error file=x::forged,comma:colon",
    "bidi\u202eevil\u202c",
    "long" + "x" * 20_000,
]


class Hostile(nn.Module):
    """A sigmoid stack whose layers all have hostile names: it gets findings on them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({name: nn.Linear(16, 16) for name in HOSTILE})
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.sigmoid(layer(x))
        return self.head(x)


@pytest.fixture(scope="module")
def doc() -> dict[str, object]:
    report = gradscope.analyze(Hostile(), (torch.randn(8, 16),), device="cpu",
                               name="Hostile <b>model</b>\n::error::x")
    out = report.to_dict()
    validate_report(out)
    return out


def _modules(doc: dict[str, object]) -> set[str]:
    return {str(layer["module"]) for layer in doc["layers"]  # type: ignore[attr-defined]
            if layer.get("module")}


def test_the_model_really_carries_the_names(doc: dict[str, object]) -> None:
    modules = _modules(doc)
    for name in HOSTILE:
        assert f"layers.{name}" in modules
    assert any(f["location"]["module"] for f in doc["findings"])  # type: ignore[attr-defined]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def test_html_has_no_injected_markup(doc: dict[str, object]) -> None:
    page = render_html(doc)  # type: ignore[arg-type]
    parser = _Collect()
    parser.feed(page)
    assert not [t for t, _ in parser.tags if t in ("img", "iframe", "object", "embed")]
    assert not [(t, k) for t, attrs in parser.tags for k, _ in attrs if k.startswith("on")]
    scripts = [attrs for t, attrs in parser.tags if t == "script"]
    # the report's own scripts: attribute-free inline ones and the JSON data block
    assert all(not attrs or attrs == [("type", "application/json"),
                                      ("id", "gradscope-report")] for attrs in scripts)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "\x1b" not in page and "\u202e" not in page.split('id="gradscope-report"')[0]
    assert "ansi\u241b[31mred" in page, "ESC shown as a control picture, not dropped"


def test_sarif_is_valid_json_with_the_strings_as_data(doc: dict[str, object]) -> None:
    sarif = json.loads(render_sarif(doc))  # type: ignore[arg-type]
    text = json.dumps(sarif)
    assert "\x1b" not in render_sarif(doc)  # type: ignore[arg-type]
    names = {loc["fullyQualifiedName"] for result in sarif["runs"][0]["results"]
             for physical in result.get("locations", [])
             for loc in physical.get("logicalLocations", [])}
    assert any(name.startswith("layers.<img") for name in names)
    assert "<img src=x onerror=alert(1)>" in text  # JSON data, never interpreted


def test_github_annotations_are_one_line_each(doc: dict[str, object]) -> None:
    out = render_github(doc)  # type: ignore[arg-type]
    lines = out.splitlines()
    assert lines and all(re.match(r"^::(error|warning|notice)( [^:]*)?::", ln) for ln in lines)
    assert "\r" not in out and "\x1b" not in out
    assert len(lines) == len(doc["findings"])  # type: ignore[arg-type]
    assert not any("::error file=x::forged" in ln for ln in lines)


def test_terminal_has_no_control_sequences(doc: dict[str, object]) -> None:
    out = render_terminal(doc, color=False)  # type: ignore[arg-type]
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "\u202e" not in out
    finding_lines = [ln for ln in out.splitlines()
                     if re.match(r"^(ERROR|WARNING|INFO)\s+GS\d{3} ", ln)]
    assert len(finding_lines) == len(doc["findings"])  # type: ignore[arg-type]


def test_json_is_strict(doc: dict[str, object]) -> None:
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc
