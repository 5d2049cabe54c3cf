"""Shared by several test modules: where the sample models are, a CLI runner, and the
trainability benchmark's modules."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"

#: Every sample model, by file stem; a test in test_sample_models_ground_truth.py
#: checks this list against the folder so a new sample cannot go unchecked.
SAMPLES = (
    "deep_sigmoid_mlp",
    "relu_mlp_kaiming",
    "plain_deep_cnn",
    "resnet_bn",
    "post_ln_transformer",
    "pre_ln_transformer",
    "large_init_mlp",
    "dead_relu_mlp",
    "nan_model",
    "data_dependent",
    "lstm",
    "two_input_model",
    "tuple_output_mlp",
)


def cli_runner() -> CliRunner:
    """A CliRunner that keeps stderr apart from stdout on every click version."""
    try:  # click 8.1 mixes stderr into stdout unless told not to; 8.2 keeps them apart
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


#: The trainability benchmark (benchmarks/trainability/): its modules import each other by
#: bare name (``import train``), so a test imports them with the folder on the path.
TRAINABILITY = Path(__file__).resolve().parent.parent / "benchmarks" / "trainability"
_BENCH_MODULES = ("run", "watch_runs", "train", "models", "data")


@contextmanager
def trainability_module(name: str, env: dict[str, str] | None = None) -> Iterator[ModuleType]:
    """``benchmarks/trainability/<name>.py`` imported fresh (with ``env`` set), and the
    bare-named modules it brought in forgotten afterwards."""
    mp = pytest.MonkeyPatch()
    for key, value in (env or {}).items():
        mp.setenv(key, value)
    mp.syspath_prepend(str(TRAINABILITY))
    for module in _BENCH_MODULES:
        sys.modules.pop(module, None)
    try:
        yield importlib.import_module(name)
    finally:
        mp.undo()
        for module in _BENCH_MODULES:
            sys.modules.pop(module, None)
