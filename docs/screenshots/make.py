"""Write the README's report screenshots: docs/screenshots/<sample>.png, 1280 x 1600.

    python docs/screenshots/make.py            # the samples below and the GPT-2 module view
    python docs/screenshots/make.py resnet_bn  # any sample model by file stem

Each sample model is analysed as ``gradscope analyze`` does, its HTML report is
written to a temporary folder and opened through file:// in Debian's Chromium
(/usr/bin/chromium) driven by playwright; ``playwright install`` is not needed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DEFAULT = ("deep_sigmoid_mlp", "post_ln_transformer")
WIDTH = 1280
#: The first screens of the report (verdict, findings, depth profile): what a user
#: sees on opening it, at a size the README can show without a 10 MB image.
HEIGHT = 1600


def write_report(name: str, folder: Path, path: Path | None = None) -> Path:
    from gradscope.api import analyze
    from gradscope.loading import load_target
    from gradscope.render.html import write_html

    loaded = load_target(str(path or REPO / "sample_models" / f"{name}.py"))
    report = analyze(loaded.model, loaded.inputs, name=loaded.name, source=loaded.source,
                     notes=loaded.notes, declared=loaded.declared,
                     loss=loaded.loss_fn or "dot")
    html = folder / f"{name}.html"
    write_html(report.to_dict(), html)
    return html


def main(names: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        for name in names:
            html = write_report(name, Path(tmp))
            page.goto(html.resolve().as_uri(), wait_until="load")
            out = HERE / f"{name}.png"
            page.screenshot(path=str(out), full_page=False)
            print(f"wrote {out.relative_to(REPO)}")
        if not names or names == list(DEFAULT):
            # The module view of examples/hf_gpt2.py, one module unfolded to its ops.
            html = write_report("gpt2", Path(tmp), REPO / "examples" / "hf_gpt2.py")
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.click("tr[data-module='transformer.h.0.attn'] button.fold")
            out = HERE / "gpt2_modules.png"
            page.locator("#modules").screenshot(path=str(out))
            print(f"wrote {out.relative_to(REPO)}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:] or list(DEFAULT)))
