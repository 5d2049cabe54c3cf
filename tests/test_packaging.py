"""The wheel, not only the editable install, must carry the templates and the schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_templates_and_schema(tmp_path: Path) -> None:
    if shutil.which("git") is None:  # pragma: no cover - hatchling needs no git, kept simple
        pytest.skip("git not available")
    pytest.importorskip("hatchling")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    wheels = list(tmp_path.glob("gradscope-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for template in (ROOT / "templates").glob("*.j2"):
        assert f"gradscope/templates/{template.name}" in names
    assert "gradscope/schema/report.schema.json" in names
    assert "gradscope/cli.py" in names
    assert "gradscope/cli_help.txt" in names, "the fast --help path reads it"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "gradscope = gradscope._entry:main" in text
