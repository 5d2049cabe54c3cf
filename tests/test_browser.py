"""HTML reports opened in a real browser: headless Chromium driven by playwright.

The report is one self-contained file that people open from disk and send to
each other, so these tests open it through ``file://`` and check what only a
browser shows: no script error, no request to the network, and that the
interactive parts (copy buttons, sorting, filtering, folding the graph) work.
A model whose module names are HTML/JS payloads checks that nothing a user's
model is called can run as script in the report.

The browser is Debian's Chromium at /usr/bin/chromium (``.ci/run`` installs
it when it can); playwright only drives it, ``playwright install`` is never
needed. Without either, every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import SAMPLE_DIR

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does "
                "this as root)", allow_module_level=True)
try:
    from playwright import sync_api
except ImportError as error:  # absent, or a broken install: skip, do not error
    pytest.skip(f"playwright cannot be imported ({error}; pip install -c constraints.txt "
                "-e '.[dev]')", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SAMPLES = ("deep_sigmoid_mlp", "resnet_bn", "post_ln_transformer")
#: Copy buttons sit on fixes that come with code; the healthy resnet_bn has none.
WITH_FIXES = ("deep_sigmoid_mlp", "post_ln_transformer")
#: Foldable modules are submodules holding more than one layer; deep_sigmoid_mlp is a
#: flat nn.Sequential, shown as plain layers with the expand/collapse buttons inert.
NESTED = ("resnet_bn", "post_ln_transformer")

#: Module names that are payloads. ModuleDict keys cannot contain '.', so the
#: ``window.__xss=1`` of a textbook payload is written ``window['__xss']=1``.
XSS_IMG = "<img src=x onerror=window['__xss']=1>"
XSS_SCRIPT = "</script><script>window['__xss']=2</script>"
HOSTILE_MODEL = f"""
    import torch
    from torch import nn

    IMG = {XSS_IMG!r}
    SCRIPT = {XSS_SCRIPT!r}


    class Hostile(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({{IMG: nn.Linear(8, 8), SCRIPT: nn.Linear(8, 4)}})

        def forward(self, x):
            return self.blocks[SCRIPT](torch.tanh(self.blocks[IMG](x)))


    def example_inputs():
        return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
"""


def write_report(target: Path, html: Path) -> Path:
    """Analyse one model file the way ``gradscope analyze FILE --html HTML`` does."""
    from gradscope.api import analyze
    from gradscope.loading import load_target
    from gradscope.render.html import write_html

    loaded = load_target(str(target))
    report = analyze(loaded.model, loaded.inputs, name=loaded.name, source=loaded.source,
                     notes=loaded.notes, declared=loaded.declared,
                     loss=loaded.loss_fn or "dot")
    write_html(report.to_dict(), html)
    html.with_suffix(".json").write_text(json.dumps(report.to_dict()), encoding="utf-8")
    return html


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reports")
    out = {name: write_report(SAMPLE_DIR / f"{name}.py", folder / f"{name}.html")
           for name in SAMPLES}
    hostile = folder / "hostile.py"
    hostile.write_text(textwrap.dedent(HOSTILE_MODEL).lstrip("\n"), encoding="utf-8")
    out["hostile"] = write_report(hostile, folder / "hostile.html")
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Opened:
    """A report open in a page, with everything the page did that it should not have."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        outside = [u for u in self.requests if not u.startswith(("file:", "data:"))]
        assert outside == [], f"requests beyond the file itself: {outside}"

    def row_names(self, visible_only: bool = False) -> list[str]:
        script = ("(rows, visible) => rows.filter(r => !visible || r.offsetParent !== null)"
                  ".map(r => r.dataset.name)")
        return list(self.page.eval_on_selector_all(
            "table.layers tr[data-name]", script, visible_only))

    def row_texts(self) -> list[str]:
        """The text of the visible layer rows (name, module path, op, figures)."""
        return list(self.page.eval_on_selector_all(
            "table.layers tr[data-name]",
            "rows => rows.filter(r => r.offsetParent !== null).map(r => r.innerText)"))


@pytest.fixture
def open_report(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def _open(path: Path, width: int = 1280, nodes: bool = True) -> Opened:
        """``nodes``: unfold the graph-node table (folded on load under the module view),
        for the tests of that table's sorting and filtering."""
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        page = context.new_page()
        opened = Opened(page, path.resolve().as_uri())
        page.on("console", lambda m: opened.errors.append(f"console: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: opened.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: opened.requests.append(r.url))
        page.goto(opened.url, wait_until="load")
        if nodes and page.locator("details.layers:not([open]) > summary").count():
            page.click("details.layers > summary")  # as a user unfolds it
        return opened

    yield _open
    for context in contexts:
        context.close()


# ------------------------------------------------------------------ every sample report


@pytest.mark.parametrize("name", SAMPLES)
def test_opens_without_errors_or_network(reports: dict[str, Path], open_report: Any,
                                         name: str) -> None:
    opened = open_report(reports[name])
    opened.page.wait_for_timeout(200)  # late timers and deferred scripts
    assert opened.page.title()
    assert opened.requests[0] == opened.url
    opened.assert_clean()


@pytest.mark.parametrize("name", WITH_FIXES)
def test_copy_buttons_click_without_error(reports: dict[str, Path], open_report: Any,
                                          name: str) -> None:
    opened = open_report(reports[name])
    buttons = opened.page.locator("button.copy")
    assert buttons.count() > 0, "no button.copy in the report"
    for i in range(min(buttons.count(), 3)):
        buttons.nth(i).scroll_into_view_if_needed()
        buttons.nth(i).click()
    opened.page.wait_for_timeout(200)  # a rejected clipboard promise surfaces late
    opened.assert_clean()


@pytest.mark.parametrize("name", SAMPLES)
def test_sort_buttons_reorder_the_layer_rows(reports: dict[str, Path], open_report: Any,
                                             name: str) -> None:
    opened = open_report(reports[name])
    before = opened.row_names()
    assert len(before) > 1, "fewer than two tr[data-name] rows in table.layers"
    buttons = opened.page.locator("table.layers button.sort")
    assert buttons.count() > 0, "no button.sort in table.layers"
    orders = []
    for i in range(buttons.count()):
        for _ in range(2):  # both directions: one of them differs from any given order
            buttons.nth(i).click()
            after = opened.row_names()
            assert sorted(after) == sorted(before), "sorting lost or duplicated rows"
            orders.append(after)
    assert any(order != before for order in orders), "no sort button changed the row order"
    opened.assert_clean()


@pytest.mark.parametrize("name", SAMPLES)
def test_filter_hides_rows_and_updates_the_count(reports: dict[str, Path], open_report: Any,
                                                 name: str) -> None:
    opened = open_report(reports[name])
    page = opened.page
    everything = opened.row_names(visible_only=True)
    assert len(everything) > 1
    count = page.locator("#layer-count")
    full_count = count.inner_text()

    page.locator("#layer-filter").fill("no-layer-is-called-this")
    page.wait_for_timeout(100)
    assert opened.row_names(visible_only=True) == []
    assert count.inner_text() != full_count

    # One layer by its full name: it stays, and names not containing it go.
    target = max(everything, key=len)
    page.locator("#layer-filter").fill("")
    page.locator("#layer-filter").press_sequentially(target)
    page.wait_for_timeout(100)
    shown = opened.row_names(visible_only=True)
    assert target in shown
    assert len(shown) < len(everything), (target, shown)
    assert count.inner_text() != full_count

    page.locator("#layer-filter").fill("")
    page.wait_for_timeout(100)
    assert opened.row_names(visible_only=True) == everything
    assert count.inner_text() == full_count
    opened.assert_clean()


@pytest.mark.parametrize("name", SAMPLES)
def test_graph_expand_and_collapse_fold_every_module(reports: dict[str, Path],
                                                     open_report: Any, name: str) -> None:
    opened = open_report(reports[name])
    page = opened.page
    modules = page.locator("details.module")
    if name in NESTED:
        assert modules.count() > 1, "no details.module in the graph"

    def open_states() -> list[bool]:
        return list(page.eval_on_selector_all("details.module", "ds => ds.map(d => d.open)"))

    page.locator("#graph-collapse").click()
    assert not any(open_states())
    page.locator("#graph-expand").click()
    assert all(open_states())
    page.locator("#graph-collapse").click()
    assert not any(open_states())
    opened.assert_clean()


@pytest.mark.parametrize("name", SAMPLES)
def test_rendered_health_classes_are_the_judged_ones(reports: dict[str, Path],
                                                     open_report: Any, name: str) -> None:
    """What the browser shows (classes and colours of the hierarchy and the table) is the
    class the rules judged each layer with, and the findings name exactly the bad ones."""
    doc = json.loads(reports[name].with_suffix(".json").read_text(encoding="utf-8"))
    css = {"ok": "ok", "warn": "warn", "bad": "bad", None: "none"}
    expected = {layer["name"]: css[layer["health_class"]] for layer in doc["layers"]}
    opened = open_report(reports[name])
    page = opened.page
    hierarchy = dict(page.eval_on_selector_all(
        "li.layer[data-node]",
        "ls => ls.map(l => [l.dataset.node, ['ok', 'warn', 'bad', 'none']"
        ".find(c => l.classList.contains(c))])"))
    assert hierarchy == expected
    table = dict(page.eval_on_selector_all(
        "table.layers tr[data-name]",
        "rows => rows.map(r => [r.dataset.name, ['ok', 'warn', 'bad', 'none']"
        ".find(c => r.querySelector('td.health').classList.contains(c))])"))
    assert table == expected
    # The colours follow the classes: every bad cell is drawn in the error colour.
    colours = dict(page.eval_on_selector_all(
        "table.layers td.health",
        "cs => cs.map(c => [c.parentElement.dataset.name, getComputedStyle(c).color])"))
    error = page.evaluate("getComputedStyle(document.documentElement)"
                          ".getPropertyValue('--error').trim()")
    bad = {n for n, c in expected.items() if c == "bad"}
    assert error
    if bad:
        assert {colours[n] for n in bad} == {page.evaluate(
            "c => { const d = document.createElement('div'); d.style.color = c; "
            "document.body.appendChild(d); const v = getComputedStyle(d).color; d.remove(); "
            "return v; }", error)}
    gradient = {f["location"]["node"] for f in doc["findings"]
                if f["rule"] in ("GS101", "GS102", "GS201", "GS202") and f["severity"] == "error"}
    assert gradient <= bad, "an error finding's layer is drawn bad"
    opened.assert_clean()


# ------------------------------------------------------------------ hostile module names


def test_hostile_module_names_are_text_not_script(reports: dict[str, Path],
                                                  open_report: Any) -> None:
    opened = open_report(reports["hostile"])
    page = opened.page
    page.wait_for_timeout(300)  # an injected <img onerror> fires after its load fails
    assert page.evaluate("typeof window.__xss") == "undefined"
    text = page.inner_text("body")
    assert XSS_IMG in text
    assert XSS_SCRIPT in text
    assert page.locator("img[src=x]").count() == 0
    # The interactive parts still work with such names: sort, filter and fold.
    for selector in ("table.layers button.sort", "#graph-collapse", "#graph-expand"):
        if page.locator(selector).count():
            page.locator(selector).first.click()
    if page.locator("#layer-filter").count():
        page.locator("#layer-filter").fill(XSS_SCRIPT)
        shown = opened.row_texts()
        assert shown and all(XSS_SCRIPT in t for t in shown), shown
    assert page.evaluate("typeof window.__xss") == "undefined"
    opened.assert_clean()


# ------------------------------------------------------------------ the module view


@pytest.fixture(scope="module")
def gpt2_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    return write_report(SAMPLE_DIR.parent / "examples" / "hf_gpt2.py", folder / "gpt2.html")


def test_gpt2_report_shows_modules_first_and_folds_the_ops(gpt2_report: Path,
                                                          open_report: Any) -> None:
    """Issue 16's done-when: on load the visible rows are modules; no ``view``,
    ``unsqueeze`` or ``arange`` row shows until a module is unfolded. (``checkVisibility``:
    a closed <details> keeps its rows laid out, hidden by content-visibility.)"""
    opened = open_report(gpt2_report, nodes=False)
    page = opened.page
    visible = page.eval_on_selector_all(
        "tbody tr", "rows => rows.filter(r => r.checkVisibility())"
        ".map(r => [r.dataset.module || '', r.dataset.name || r.dataset.op || ''])")
    nodes = [name for module, name in visible if name]
    assert not nodes, nodes[:5]  # no graph-node row, no op row
    modules = {module for module, _ in visible if module}
    assert {"transformer.h.0.attn", "transformer.h.0.mlp.c_fc", "lm_head"} <= modules
    names = page.eval_on_selector_all("tr", "rows => rows.filter(r => r.checkVisibility())"
                                      ".map(r => r.innerText.split('\\t')[0].trim())")
    assert not [n for n in names if n.split("_")[0] in ("view", "unsqueeze", "arange")]
    # unfold one module: its own ops appear under it, and fold again
    fold = "tr[data-module='transformer.h.0.attn'] button.fold"
    page.click(fold)
    ops = page.eval_on_selector_all(
        "tr.op", "rows => rows.filter(r => r.checkVisibility()).map(r => r.dataset.op)")
    assert ops and any(op.startswith("view") for op in ops), ops
    assert page.get_attribute(fold, "aria-expanded") == "true"
    page.click(fold)
    assert not page.eval_on_selector_all(
        "tr.op", "rows => rows.filter(r => r.checkVisibility()).map(r => r.dataset.op)")
    # the charts: weight gradients by layer, one drawn bar per weight layer, and the
    # depth profile's module spans (h.0 ... h.3 labelled)
    doc = json.loads(gpt2_report.with_suffix(".json").read_text(encoding="utf-8"))
    weighted = [la for la in doc["layers"] if (la.get("param_grad_norm") or 0) > 0]
    bars = page.locator("svg.grads line.grad-bar")
    assert bars.count() == len(weighted) > 0 and page.locator("svg.grads").is_visible()
    # a vertical line's box has no width (playwright calls it invisible): its height
    assert bars.first.bounding_box()["height"] > 0  # type: ignore[index]
    spans = page.eval_on_selector_all("svg.profile text.span-label", "ts => ts.map(t => "
                                      "t.textContent)")
    assert {"h.0", "h.1", "h.2", "h.3"} <= set(spans), spans
    opened.assert_clean()

