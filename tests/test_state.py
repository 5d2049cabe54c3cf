"""``analyze`` leaves the model exactly as it found it (docs/contract.md section 3).

Parameters and buffers bit for bit (BatchNorm running statistics and
``num_batches_tracked`` included), the identity of every parameter, buffer and
``.grad`` object, ``requires_grad`` flags, the train/eval flag of every
submodule, every hook dictionary (user hooks registered before still there,
none of gradscope's left), and the torch RNG state. Also when the forward
raises midway through the probe, and on Ctrl-C (KeyboardInterrupt, which must
propagate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import gradscope
from gradscope.errors import ModelRunError
from gradscope.loading import load_target
from gradscope.state import preserved

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"
SAMPLES = sorted(p.stem for p in SAMPLE_DIR.glob("*.py"))

HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                "_global_backward_hooks", "_global_backward_pre_hooks")


class Snapshot:
    """Everything the contract promises to keep, recorded independently of gradscope."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [(n, p, p.detach().clone(), p.data_ptr(), p.device, p.dtype)
                       for n, p in model.named_parameters()]
        self.buffers = [(n, b, b.detach().clone(), b.data_ptr())
                        for n, b in model.named_buffers()]
        self.grads = [(n, p.grad, None if p.grad is None else p.grad.detach().clone())
                      for n, p in model.named_parameters()]
        self.requires_grad = [(n, p.requires_grad) for n, p in model.named_parameters()]
        self.training = [(n, m.training) for n, m in model.named_modules()]
        self.hooks = [(n, attr, list(getattr(m, attr).items()))
                      for n, m in model.named_modules() for attr in HOOK_DICTS
                      if isinstance(getattr(m, attr, None), dict)]
        self.global_hooks = [(attr, list(getattr(nn.modules.module, attr).items()))
                             for attr in GLOBAL_HOOKS]
        self.rng = torch.get_rng_state()

    def assert_unchanged(self) -> None:
        model = self.model
        params = dict(model.named_parameters())
        assert list(params) == [n for n, *_ in self.params]
        for name, p, value, ptr, device, dtype in self.params:
            assert params[name] is p, f"parameter {name} replaced"
            assert p.device == device and p.dtype == dtype, name
            assert p.data_ptr() == ptr, f"parameter {name} storage replaced"
            assert torch.equal(p.detach(), value), f"parameter {name} changed"
        buffers = dict(model.named_buffers())
        assert list(buffers) == [n for n, *_ in self.buffers]
        for name, b, value, ptr in self.buffers:
            assert buffers[name] is b, f"buffer {name} replaced"
            assert b.data_ptr() == ptr, name
            assert b.dtype == value.dtype, name
            assert torch.equal(b, value), f"buffer {name} changed"
        for name, grad, value in self.grads:
            p = params[name]
            assert p.grad is grad, f".grad of {name} replaced"
            if value is not None:
                assert torch.equal(p.grad, value), f".grad of {name} changed"
        assert [(n, p.requires_grad) for n, p in model.named_parameters()] == self.requires_grad
        assert [(n, m.training) for n, m in model.named_modules()] == self.training
        hooks = [(n, attr, list(getattr(m, attr).items()))
                 for n, m in model.named_modules() for attr in HOOK_DICTS
                 if isinstance(getattr(m, attr, None), dict)]
        assert hooks == self.hooks
        assert [(attr, list(getattr(nn.modules.module, attr).items()))
                for attr in GLOBAL_HOOKS] == self.global_hooks
        assert torch.equal(torch.get_rng_state(), self.rng), "torch RNG state changed"


def _prepare(model: nn.Module) -> dict[str, int]:
    """Make the model's state non-default in every way the contract covers."""
    params = list(model.parameters())
    g = torch.Generator().manual_seed(7)
    # Pre-existing gradients on some parameters (others keep None).
    for p in params[::2]:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    # A frozen parameter that is not the last one.
    if len(params) > 2:
        params[1].requires_grad_(False)
    # Some submodules in eval mode, the root in train mode.
    model.train()
    for i, (_, m) in enumerate(model.named_modules()):
        if i % 3 == 1:
            m.eval()
    # User hooks that must survive (and may run: they only count).
    calls = {"forward": 0, "pre": 0}
    model.register_forward_hook(lambda m, a, o: calls.__setitem__("forward", calls["forward"] + 1))
    leaf = next(m for m in model.modules() if next(m.children(), None) is None)
    leaf.register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", calls["pre"] + 1))
    model.register_state_dict_pre_hook(lambda *a, **k: None)
    return calls


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_model_unchanged(name: str) -> None:
    loaded = load_target(str(SAMPLE_DIR / f"{name}.py"))
    model = loaded.model
    _prepare(model)
    torch.manual_seed(1234)  # an RNG state gradscope did not set
    snap = Snapshot(model)
    report = gradscope.analyze(model, loaded.inputs, device="cpu")
    assert report.probe.enabled
    snap.assert_unchanged()


def test_batchnorm_statistics_restored_after_probe() -> None:
    """The probe runs BatchNorm in train mode, which updates running stats in place."""
    loaded = load_target(str(SAMPLE_DIR / "resnet_bn.py"))
    model = loaded.model
    model.eval()
    bn = model.stem[1]
    mean, var, count = (bn.running_mean.clone(), bn.running_var.clone(),
                        bn.num_batches_tracked.clone())
    gradscope.analyze(model, loaded.inputs, device="cpu")
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)
    assert not model.training and not bn.training


# ---------------------------------------------------------------------------
# Failures midway


class Fragile(nn.Module):
    """BatchNorm and dropout run (changing stats and RNG), then the forward raises.

    ``mode="forward"`` raises from forward itself whenever gradients are on: fx
    and export cannot trace it, the runtime recorder (which runs under no_grad)
    can, and the probe's forward raises. ``mode="hook"`` raises from a forward
    hook on ``fc2`` only for real tensors with gradients: every tracer gets
    through, and the probe raises when fc2 runs.
    """

    def __init__(self, error: type[BaseException], mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)
        self.error = error
        self.mode = mode
        if mode == "hook":
            self.fc2.register_forward_hook(self._bomb)

    def _bomb(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad and not isinstance(out, FakeTensor):
            raise self.error("boom in the probe")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))
        if self.mode == "forward" and torch.is_grad_enabled():
            raise self.error("boom in the probe")
        return self.fc3(h)


@pytest.mark.parametrize("mode", ["forward", "hook"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_restored_when_the_probe_raises(error: type[BaseException], mode: str) -> None:
    model = Fragile(error, mode)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    model.fc3.bias.requires_grad_(False)
    model.eval()  # the probe switches to train mode: BN and dropout then act
    torch.manual_seed(99)
    snap = Snapshot(model)
    expected: type[BaseException] = ModelRunError if error is RuntimeError else error
    tracer = "runtime" if mode == "forward" else None  # the default order for the hook mode
    with pytest.raises(expected) as info:
        gradscope.analyze(model, x, device="cpu", tracer=tracer)
    if error is RuntimeError:
        assert "boom in the probe" in str(info.value)
    snap.assert_unchanged()
    # The state really was disturbed before the raise (the test is not vacuous):
    # running the same forward in train mode by hand changes the BN statistics.
    before = model.bn.running_mean.clone()
    model.train()
    with torch.no_grad():
        model.bn(model.fc1(x))
    assert not torch.equal(model.bn.running_mean, before)


def test_restored_when_tracing_raises_keyboard_interrupt() -> None:
    class Interrupt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyboardInterrupt

    model = Interrupt()
    model.eval()
    x = torch.randn(2, 4)
    snap = Snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        gradscope.analyze(model, x, device="cpu")
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# gradscope.state.preserved on its own


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("convert", ["double", "meta"])
def test_preserved_undoes_module_conversion(convert: str) -> None:
    """``Module.to`` (as the probe does for another device) swaps parameter data,
    replaces buffer objects and moves ``.grad`` in place; all of it is undone.
    (dtype and meta conversions take the same code path as a device move.)"""
    model = _bn_model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    snap = Snapshot(model)
    with preserved(model):
        if convert == "double":
            model.double()
            model(torch.randn(3, 4, dtype=torch.float64))
        else:
            model.to("meta")
    snap.assert_unchanged()


def test_preserved_restores_in_place_writes_and_flags() -> None:
    model = _bn_model()
    snap = Snapshot(model)
    handle_count = len(model._forward_hooks)
    with preserved(model):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[0].weight.data.mul_(3.0)  # invisible to the parameter's version counter
            model[1].running_mean.fill_(5.0)
        model[1].num_batches_tracked += 1
        model[3].weight.requires_grad_(False)
        model[0].bias.grad = torch.zeros_like(model[0].bias)
        model.eval()
        model.register_forward_hook(lambda *a: None)
        nn.modules.module.register_module_forward_hook(lambda *a: None)
        torch.rand(3)
    assert len(model._forward_hooks) == handle_count
    snap.assert_unchanged()


def test_preserved_restores_on_exception() -> None:
    model = _bn_model()
    snap = Snapshot(model)
    with pytest.raises(ValueError), preserved(model):
        model.train()
        model(torch.randn(5, 4))  # BN statistics move
        raise ValueError("midway")
    snap.assert_unchanged()
