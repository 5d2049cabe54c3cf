"""Shared by several test modules: where the sample models are, a CLI runner, the
trainability benchmark's modules, and torchrun."""

from __future__ import annotations

import importlib
import os
import subprocess
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


TESTS = Path(__file__).resolve().parent


def torchrun(args: list[str], cwd: Path, *, port: int = 29500,
             timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``args`` on 2 processes under torchrun (gloo on the CPU), the repository and the
    tests importable; ``port`` + this process's id picks the rendezvous port, so tests run
    one after another do not meet a port still closing."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port + os.getpid() % 1000), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)
