"""A small subset of the watch's score on the trainability benchmark (issue 18).

Real runs on sklearn's digits, the first 50 steps of each trained exactly as the benchmark
trains them, under ``gradscope.watch``: failures the before-training analysis missed must
be flagged (a warning or error finding), runs that trained must not. The full score (all
232 runs) is in docs/watch.md, from ``benchmarks/trainability/watch_runs.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import sklearn.datasets  # noqa: F401 - the test extra: a missing install fails, never skips
from helpers import trainability_module

#: Real training runs (a 30-layer MLP, a ResNet): seconds each, more on a loaded machine.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def watch_runs() -> Any:
    with trainability_module("watch_runs") as module:
        yield module


#: (architecture, recipe, seed, the rule that must flag it or None for a run that trained),
#: from docs/trainability.md's table: the first two failed although the before-training
#: analysis called them healthy; the last two trained.
CASES = [
    ("mlp30_relu_layernorm", "sgd", 0, "GS105"),
    ("mlp50_relu_kaiming", "sgd", 1, "GS105"),
    ("mlp2_relu", "adam", 0, None),
    ("resnet8_bn", "sgd", 0, None),
]


@pytest.mark.parametrize("arch,recipe,seed,rule", CASES)
def test_watch_flags_missed_failures_and_not_trained_runs(
        watch_runs: Any, arch: str, recipe: str, seed: int, rule: str | None) -> None:
    known = watch_runs.outcomes()[(arch, recipe, seed)]
    assert known["failed"] == (rule is not None)
    assert known["status"] != "unhealthy"  # missed (or rightly passed) before training
    result = watch_runs.watched_run(arch, recipe, seed, horizon=50, every=10)
    flags = [f["rule"] for f in result["report"]["findings"]
             if f["severity"] in ("error", "warning")]
    if rule is None:
        assert flags == []
    else:
        assert rule in flags
    assert result["record"]["steps"] == 50
