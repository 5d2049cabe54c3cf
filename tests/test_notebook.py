"""The report inline in a Jupyter notebook: a notebook executed for real, its output opened.

Many users first try a model in a notebook. ``gradscope.analyze`` returns a report whose
``_repr_html_`` is the HTML report (the same page ``--html`` writes) in an iframe, so its
styles and scripts stay its own. The notebook is executed with nbclient on a real
ipykernel; its HTML output is then opened in Chromium (as ``tests/test_browser.py``
does) to check the report renders there: the verdict, the module view, no script error
and no request beyond the page.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -c constraints.txt -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="pip install -c constraints.txt -e '.[dev]'")
pytest.importorskip("ipykernel", reason="pip install -c constraints.txt -e '.[dev]'")

pytestmark = pytest.mark.slow

CELLS = [
    "import torch\nfrom torch import nn\nimport gradscope",
    "torch.manual_seed(0)\n"
    "layers = []\n"
    "for _ in range(12):\n"
    "    layers += [nn.Linear(16, 16), nn.Sigmoid()]\n"
    "model = nn.Sequential(*layers)",
    "report = gradscope.analyze(model, torch.randn(8, 16))\nreport",
]


@pytest.fixture(scope="module")
def notebook_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The last cell's text/html output, from a real kernel."""
    folder = tmp_path_factory.mktemp("notebook")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    client.execute()
    outputs = nb.cells[-1].outputs
    found = [o for o in outputs if o.get("output_type") == "execute_result"]
    assert found, outputs
    return str(found[0]["data"]["text/html"])


def test_the_report_is_the_cells_html_output(notebook_html: str) -> None:
    assert notebook_html.startswith('<iframe class="gradscope-report"')
    page = html.unescape(re.search(r'srcdoc="([^"]*)"', notebook_html).group(1))  # type: ignore[union-attr]
    assert page.startswith("<!DOCTYPE html>") and "gradscope" in page
    assert 'id="modules"' in page and "UNHEALTHY" in page.upper()
    # self-contained: nothing fetched from a network
    assert not re.search(r'(src|href)="https?://', page)


def test_the_output_renders_in_a_browser(notebook_html: str, tmp_path: Path) -> None:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"no Chromium at {chromium}")
    sync_api = pytest.importorskip("playwright.sync_api")
    # A notebook page holds the output as it is; a plain page stands in for it here.
    out = tmp_path / "cell_output.html"
    out.write_text(f"<!DOCTYPE html><html><body>{notebook_html}</body></html>",
                   encoding="utf-8")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.resolve().as_uri(), wait_until="load")
            frame: Any = page.frame_locator("iframe.gradscope-report")
            assert "UNHEALTHY" in frame.locator("body").inner_text().upper()
            rows = frame.locator("table.modules tr[data-module]")
            assert rows.count() >= 24  # 12 Linear + 12 Sigmoid modules
            assert frame.locator("table.modules tr[data-module]").first.is_visible()
        finally:
            browser.close()
    assert errors == [], errors
    assert [u for u in requests if not u.startswith(("file:", "data:", "about:"))] == []
