"""``--distributed`` (issue 17): FSDP2 over 2 gloo processes gives the in-memory figures.

The probe runs under ``torchrun --nproc-per-node 2`` (``tests/workers/distributed_probe.py``
for the API, the CLI for the end-to-end test); every probe figure of every node must
agree with the in-memory probe of the same weights within 1e-4 relative (the worker
compares them with ``test_stream.assert_same_probe``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import SAMPLE_DIR, SAMPLES, torchrun
from hypothesis import HealthCheck, given, settings
from strategies import build, model_specs
from test_stream import NO_BLOCKS, NOT_ON_META

import gradscope
from gradscope.errors import ConfigError, InputError
from gradscope.loading import load_target
from gradscope.streaming import find_blocks, materialise_all

HERE = Path(__file__).resolve().parent
WORKER = HERE / "workers" / "distributed_probe.py"
pytestmark = pytest.mark.slow


def _generated_specs(count: int = 10) -> list[str]:
    """Reprs of the first ``count`` generated models with repeated blocks (derandomised)."""
    found: list[str] = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(spec=model_specs())
    def collect(spec: Any) -> None:
        if len(found) >= count:
            return
        model, inputs = build(spec)
        try:
            find_blocks(model)
            gradscope.analyze(model, inputs, tracer="runtime", lr_range=False)
        except (InputError, gradscope.GradscopeError):
            return  # nothing repeated to shard, or a documented error of the model
        found.append(repr(spec))

    collect()
    return found


def test_distributed_probe_matches_in_memory_probe(tmp_path: Path) -> None:
    cases: list[dict[str, str]] = [{"sample": s} for s in SAMPLES
                                   if s not in NO_BLOCKS + NOT_ON_META]
    cases += [{"spec": spec} for spec in _generated_specs()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = torchrun([str(WORKER), "cases.json", "out.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert len(results) == len(cases)
    errors = [r for r in results if "error" in r]
    assert not errors, errors
    assert all(r["compared"] > 0 for r in results if "sample" in r["case"])
    assert sum(r["compared"] > 0 for r in results if "spec" in r["case"]) >= 5


def test_cli_under_torchrun_writes_one_report(tmp_path: Path) -> None:
    sample = SAMPLE_DIR / "pre_ln_transformer.py"
    proc = torchrun(["-m", "gradscope", "analyze", str(sample), "--distributed",
                      "--json", "report.json", "--fail-on", "never", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(n.startswith("--distributed: the probe ran on 2 processes (gloo)")
               for n in report["notes"])
    # the same figures as the in-memory probe of the same weights
    loaded = load_target(str(sample), meta=True, values=True)
    materialise_all(loaded.model)
    plain = gradscope.analyze(loaded.model, loaded.inputs, tracer="runtime").to_dict()
    by_name = {layer["name"]: layer for layer in plain["layers"]}
    compared = 0
    for layer in report["layers"]:
        mine, theirs = layer.get("probe_grad_rms"), by_name[layer["name"]].get("probe_grad_rms")
        assert (mine is None) == (theirs is None), layer["name"]
        if mine is not None:
            assert mine == pytest.approx(theirs, rel=1e-4)
            compared += 1
    assert compared > 10


def test_distributed_outside_torchrun_is_a_one_line_error() -> None:
    env_has = "WORLD_SIZE" in os.environ
    if env_has:
        pytest.skip("running under a launcher")
    loaded = load_target(str(SAMPLE_DIR / "deep_sigmoid_mlp.py"), meta=True, values=True)
    with pytest.raises(ConfigError) as info:
        gradscope.analyze(loaded.model, loaded.inputs, distributed=True)
    assert "torchrun" in info.value.hint
