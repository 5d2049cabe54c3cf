"""``analyze`` on generated architectures (issue 8): a report or a documented error, never a crash.

For every model :mod:`strategies` draws, ``gradscope.analyze(model, inputs,
device="cpu")`` either returns a report that validates against the JSON schema
and serialises with ``allow_nan=False``, or raises a subclass of
``gradscope.GradscopeError`` defined in ``gradscope/errors.py``, with a
one-line message. Either way the model is left as docs/contract.md section 3 says:
parameters and buffers bit for bit (BatchNorm running statistics and
``num_batches_tracked`` included), ``.grad`` fields set beforehand, the
``requires_grad`` flags, the train/eval flag of every submodule, no hook added
or removed (module and global hook dictionaries), and the torch CPU RNG state.

Hypothesis profiles (``GRADSCOPE_HYPOTHESIS_PROFILE``): ``ci`` (the default:
150 examples for each of the four generated tests, 600 in all, about 70 s on two
cores; derandomized, so every run draws the same models) and ``large`` (2000
per test). Each example also draws the probe mode, the batch count, the loss,
``probe=False``, an ``lr`` and a forced tracer (runtime or export).
They are applied per test here, not loaded globally, so other test modules keep
their own settings.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import BlockSpec, ModelSpec, build, model_specs
from torch import nn

import gradscope
import gradscope.errors
from gradscope.schema import validate_report

_COMMON: dict[str, Any] = dict(deadline=None, derandomize=True, database=None,
                               suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
settings.register_profile("gradscope-ci", max_examples=150, **_COMMON)
settings.register_profile("gradscope-large", max_examples=2000, **_COMMON)
PROFILE = settings.get_profile(
    "gradscope-" + os.environ.get("GRADSCOPE_HYPOTHESIS_PROFILE", "ci"))

DOCUMENTED_ERRORS = tuple(
    cls for _, cls in inspect.getmembers(gradscope.errors, inspect.isclass)
    if issubclass(cls, gradscope.GradscopeError))

HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_full_backward_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = tuple(sorted(name for name, value in vars(nn.modules.module).items()
                            if name.startswith("_global_") and isinstance(value, dict)))


class Snapshot:
    """Everything docs/contract.md section 3 promises to keep, recorded without gradscope's help."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [(n, p, p.detach().clone(), p.data_ptr(), p.dtype)
                       for n, p in model.named_parameters(remove_duplicate=False)]
        self.buffers = [(n, b, b.detach().clone(), b.data_ptr())
                        for n, b in model.named_buffers()]
        self.grads = [(n, p.grad, None if p.grad is None else p.grad.detach().clone())
                      for n, p in model.named_parameters()]
        self.requires_grad = [(n, p.requires_grad) for n, p in model.named_parameters()]
        self.training = [(n, m.training) for n, m in model.named_modules()]
        self.hooks = self._hooks()
        self.rng = torch.get_rng_state()

    def _hooks(self) -> list[tuple[str, str, list[Any]]]:
        found = [(n, attr, list(getattr(m, attr).items()))
                 for n, m in self.model.named_modules() for attr in HOOK_DICTS
                 if isinstance(getattr(m, attr, None), dict)]
        found += [("<global>", attr, list(getattr(nn.modules.module, attr).items()))
                  for attr in GLOBAL_HOOKS]
        return found

    def assert_unchanged(self) -> None:
        model = self.model
        params = dict(model.named_parameters(remove_duplicate=False))
        assert list(params) == [n for n, *_ in self.params]
        for name, p, value, ptr, dtype in self.params:
            assert params[name] is p, f"parameter {name} replaced"
            assert p.dtype == dtype and p.device.type == "cpu", name
            assert p.data_ptr() == ptr, f"parameter {name} storage replaced"
            assert torch.equal(p.detach(), value), f"parameter {name} changed"
        buffers = dict(model.named_buffers())
        assert list(buffers) == [n for n, *_ in self.buffers]
        for name, b, value, ptr in self.buffers:
            assert buffers[name] is b, f"buffer {name} replaced"
            assert b.data_ptr() == ptr and b.dtype == value.dtype, name
            assert torch.equal(b, value), f"buffer {name} changed"
        for name, grad, value in self.grads:
            p = params[name]
            assert p.grad is grad, f".grad of {name} replaced"
            if value is not None:
                assert torch.equal(p.grad, value), f".grad of {name} changed"
        assert [(n, p.requires_grad) for n, p in model.named_parameters()] == self.requires_grad
        assert [(n, m.training) for n, m in model.named_modules()] == self.training
        assert self._hooks() == self.hooks, "hooks added or removed"
        assert torch.equal(torch.get_rng_state(), self.rng), "torch RNG state changed"


def _disturb(model: nn.Module, seed: int) -> None:
    """Non-default state: grads on some parameters, and user hooks that must survive."""
    g = torch.Generator().manual_seed(seed)
    for p in list(dict.fromkeys(model.parameters()))[::2]:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    model.register_forward_hook(lambda m, a, o: None)
    leaf = next((m for m in model.modules() if next(m.children(), None) is None), None)
    if leaf is not None:
        leaf.register_forward_pre_hook(lambda m, a: None)


def check_analyze(spec: ModelSpec, mode: str = "train", batches: int = 2,
                  probe: bool = True, lr: float | None = None, tracer: str | None = None,
                  loss: str = "dot") -> Any:
    """Run analyze on the spec's model: a valid report or a documented error; model unchanged.

    Returns the report, or the GradscopeError raised.
    """
    model, inputs = build(spec)
    _disturb(model, spec.seed)
    torch.manual_seed(spec.seed + 2)
    snap = Snapshot(model)
    # A clone: some models modify their inputs in place (nn.ReLU(inplace=True) first).
    given_inputs = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
    try:
        report = gradscope.analyze(model, given_inputs, device="cpu", probe=probe,
                                   batches=batches, probe_mode=mode, lr=lr, tracer=tracer,
                                   loss=loss)
    except gradscope.GradscopeError as exc:
        snap.assert_unchanged()
        assert type(exc) in DOCUMENTED_ERRORS, type(exc)
        line = exc.one_line()
        assert line and "\n" not in line
        return exc
    snap.assert_unchanged()
    doc = report.to_dict()
    validate_report(doc)
    json.dumps(doc, allow_nan=False)
    return report


def _draw_run(data: st.DataObject, spec: ModelSpec) -> Any:
    mode = data.draw(st.sampled_from(["train", "eval"]), label="probe_mode")
    batches = data.draw(st.integers(1, 3), label="batches")
    probe = data.draw(st.sampled_from([True, True, True, False]), label="probe")
    lr = data.draw(st.sampled_from([None, 1e-3]), label="lr")
    # None: the usual fallback order; forcing one runs every architecture through it.
    tracer = data.draw(st.sampled_from([None, None, "runtime", "export"]), label="tracer")
    loss = data.draw(st.sampled_from(["dot", "sum", "mse", "cross_entropy"]), label="loss")
    return check_analyze(spec, mode, batches, probe, lr, tracer, loss)


@pytest.mark.slow
@settings(PROFILE)
@given(model_specs(families=("vector", "free")), st.data())
def test_generated_vector_models(spec: ModelSpec, data: st.DataObject) -> None:
    _draw_run(data, spec)


@pytest.mark.slow
@settings(PROFILE)
@given(model_specs(families=("conv1d", "conv2d")), st.data())
def test_generated_conv_models(spec: ModelSpec, data: st.DataObject) -> None:
    _draw_run(data, spec)


@pytest.mark.slow
@settings(PROFILE)
@given(model_specs(families=("sequence", "tokens")), st.data())
def test_generated_sequence_models(spec: ModelSpec, data: st.DataObject) -> None:
    _draw_run(data, spec)


@pytest.mark.slow
@settings(PROFILE)
@given(model_specs(max_blocks=5, max_width=8), st.data())
def test_generated_models_any_family(spec: ModelSpec, data: st.DataObject) -> None:
    _draw_run(data, spec)


# ---------------------------------------------------------------------------
# Fixed cases: the odd corners named in the issue, checked on every run.

ODD_CASES = {
    "batchnorm_batch_1_train": ModelSpec(
        "vector", batch=1, blocks=(BlockSpec("dense", width=3, norm="bn", act="relu"),)),
    "batchnorm2d_1x1_batch_1": ModelSpec(
        "conv2d", batch=1, length=1, blocks=(BlockSpec("conv", width=2, norm="bn"),)),
    "width_1": ModelSpec("vector", width=1, blocks=(
        BlockSpec("dense", width=1, norm="ln", act="tanh"),), head=1),
    "no_parameters": ModelSpec("free", blocks=(BlockSpec("act", act="sigmoid"),), head=None),
    "all_frozen": ModelSpec("vector", blocks=(BlockSpec("dense", width=3, act="relu"),),
                            frozen="all"),
    "inplace_relu_on_input": ModelSpec(
        "free", blocks=(BlockSpec("act", act="relu", inplace=True),), head=None),
    "tied_embedding_head": ModelSpec(
        "tokens", blocks=(BlockSpec("mha", heads=1, skip=True),), tie=True, head=None,
        extras=("mask", "type_ids"), output="dict_logits"),
    "lstm_last_state": ModelSpec(
        "sequence", blocks=(BlockSpec("lstm", width=3, layers=2, bidirectional=True,
                                      last=True, dropout=0.1),), output="tuple"),
    "repeated_block_and_buffers": ModelSpec(
        "vector", width=4, blocks=(BlockSpec("dense", width=4, norm="bn", act="silu",
                                             inplace=True, add_inplace=True, repeat=3,
                                             skip=True),), buffer="ema", tie=True),
    "data_dependent_branch": ModelSpec(
        "vector", blocks=(BlockSpec("dense", width=3, act="gelu"),), branch=True,
        buffer="counter", output="int_first"),
    "eval_model_sdpa_causal": ModelSpec(
        "sequence", width=4, blocks=(BlockSpec("sdpa", heads=2, causal=True, dropout=0.5),),
        train=False, output="nested", dtype="float64"),
}


@pytest.mark.parametrize("name", list(ODD_CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_odd_cases(name: str, mode: str) -> None:
    check_analyze(ODD_CASES[name], mode=mode, batches=2)


def test_batchnorm_batch_1_in_train_is_a_documented_error() -> None:
    """torch raises on BatchNorm in train mode with one value per channel; gradscope says so."""
    result = check_analyze(ODD_CASES["batchnorm_batch_1_train"], mode="train")
    assert isinstance(result, gradscope.GradscopeError)


def test_inplace_activation_on_the_input_is_probed() -> None:
    """Regression: the probe made its float inputs leaves requiring grad and fed them to the
    model, so ``nn.ReLU(inplace=True)`` as the first layer raised "a leaf Variable that
    requires grad is being used in an in-place operation" (a ModelRunError) for a model
    plain torch runs; the probe now feeds a non-leaf copy (gradscope/probe.py)."""
    spec = ModelSpec("vector", blocks=(BlockSpec("act", act="relu", inplace=True),
                                       BlockSpec("dense", width=3, act="tanh")))
    for mode in ("train", "eval"):
        report = check_analyze(spec, mode=mode)
        assert isinstance(report, gradscope.Report), report
        assert report.probe.enabled
        assert any(layer.probe_grad_rms for layer in report.layers)
    free = check_analyze(ODD_CASES["inplace_relu_on_input"])
    assert isinstance(free, gradscope.Report), free


def test_strategy_is_deterministic() -> None:
    spec = ModelSpec("tokens", blocks=(BlockSpec("gru", width=2),), extras=("vector",))
    state = torch.get_rng_state()
    (m1, x1), (m2, x2) = build(spec), build(spec)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2, strict=True))


__all__ = ["check_analyze", "example"]
