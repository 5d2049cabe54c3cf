"""Shared by several test modules: where the sample models are, and a CLI runner."""

from __future__ import annotations

from pathlib import Path

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
