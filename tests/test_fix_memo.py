"""The rules' memoised fixes and graph searches (issue 15): each verified fix costs a
static estimate, so a fix two rules offer is estimated once; a memo must never answer
one question with another's result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

# ---------------------------------------------------------------------------
# Memoised fixes


def _analysis(model: nn.Module, x: torch.Tensor) -> Any:
    import gradscope

    return gradscope.analyze(model, (x,), device="cpu")


def test_fixes_asked_twice_are_estimated_once_and_each_question_keeps_its_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GS701's plain run and the vanishing fixes both offer the skips: one pair of
    estimates, the same recommendation in both; other questions are not answered by it."""
    from gradscope.rules import fixes as fixes_module

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    runs: list[str] = []
    real = fixes_module.Fixer._residual

    def counted(self: Any, worst: str) -> Any:
        runs.append(worst)
        return real(self, worst)

    monkeypatch.setattr(fixes_module.Fixer, "_residual", counted)
    report = _analysis(model, torch.randn(16, 32))
    skips = [r for f in report.findings for r in f.recommendations
             if r.kind == "residual_connection"]
    assert len(skips) >= 2  # offered by two rules
    assert len(runs) == len(set(runs))  # each direction estimated once
    assert all(r == skips[0] for r in skips if r.targets == skips[0].targets)


def test_zero_bias_memo_keys_on_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradscope.rules import fixes as fixes_module

    asked: list[tuple[str, ...]] = []

    def fake(self: Any, nodes: Any, worst: str) -> Any:
        asked.append(tuple(nodes))
        return tuple(nodes)

    monkeypatch.setattr(fixes_module.Fixer, "_zero_bias", fake)

    class _A:
        def __init__(self) -> None:
            self.memo: dict[str, Any] = {}

        def remember(self, key: str, compute: Any) -> Any:
            if key not in self.memo:
                self.memo[key] = compute()
            return self.memo[key]

    fixer = fixes_module.Fixer.__new__(fixes_module.Fixer)
    fixer.analysis = _A()  # type: ignore[assignment]
    assert fixer.zero_bias(["a"]) == ("a",)
    assert fixer.zero_bias(["a", "b"]) == ("a", "b")
    assert fixer.zero_bias(["a"]) == ("a",)
    assert fixer.zero_bias(["a"], "high") == ("a",)
    assert asked == [("a",), ("a", "b"), ("a",)]


def test_between_is_descendants_and_ancestors_intersected() -> None:
    import random

    import networkx as nx

    from gradscope.rules.fixes import _between

    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 25)
        graph = nx.DiGraph()
        graph.add_nodes_from(str(i) for i in range(n))
        graph.add_edges_from((str(i), str(j)) for i in range(n) for j in range(i + 1, n)
                             if rng.random() < 0.2)
        for a in graph.nodes:
            for b in graph.nodes:
                assert _between(graph, a, b) == nx.descendants(graph, a) & nx.ancestors(graph, b)
