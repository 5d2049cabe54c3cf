"""The package's structure, checked: the import contract of pyproject.toml and no cycles.

``lint-imports`` (import-linter) enforces the pipeline's layers and keeps torch out of
the report model, the renderers and the rule registry; ``.ci/run`` runs it too. The
cycle test below is stricter than import-linter's sibling check: no two modules of
gradscope may import each other, directly or through others (type-only imports
under ``TYPE_CHECKING`` excepted: they never run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parent.parent

grimp = pytest.importorskip("grimp", reason="import-linter (the dev extra) is not installed")


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("gradscope", exclude_type_checking_imports=True, cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("gradscope"):
                edges.add_edge(module, imported)
    # A package imports its own submodules to re-export them: that is not a cycle of code.
    for module in list(edges.nodes):
        for imported in list(edges.successors(module)):
            if imported.startswith(module + "."):
                edges.remove_edge(module, imported)
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert cycles == [], cycles


def test_import_contract_holds() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) \
        or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("lint-imports is not installed")
    proc = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
