"""Leave the user's model exactly as it was found (docs/contract.md section 3).

Everything gradscope might touch is recorded on entry and put back in a
``finally``, also when the forward raises midway or the user presses Ctrl-C:
parameter and buffer values, ``.grad`` fields, ``requires_grad`` flags, the
train/eval flag of every submodule, every hook dictionary, the device of
every tensor, and the torch CPU and CUDA RNG states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Parameters are copied for a bit-exact restore up to this size; above it only
#: their identity and version counters are kept (no forward gradscope runs
#: writes to parameters; a model whose own forward does is noted). A copy costs
#: a whole model's worth of memory, and the probe's budget is 1.5x a bare
#: forward+backward, so large models are guarded by version counters alone.
CLONE_LIMIT_BYTES = 256 << 20

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class _Snapshot:
    #: (tensor, alias of its original storage, tensor version, alias version, copy).
    #: ``tensor.data`` is a fresh alias with its own version counter on every access, and
    #: batch_norm writes running statistics without bumping any counter: copies are
    #: compared by value; versions only flag changes to tensors too large to copy.
    tensors: list[tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]] = \
        field(default_factory=list)
    #: (parameter, its .grad, alias of the grad's original storage).
    grads: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = \
        field(default_factory=list)
    #: Each module's ``_parameters`` and ``_buffers`` dicts and their entries
    #: (``Module.to`` replaces buffer objects rather than their data).
    slots: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    requires_grad: list[tuple[torch.Tensor, bool]] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    hooks: list[tuple[dict[Any, Any], dict[Any, Any]]] = field(default_factory=list)
    cpu_rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def _take(model: nn.Module) -> _Snapshot:
    snap = _Snapshot()
    params = list(dict.fromkeys(model.parameters()))
    buffers = list(dict.fromkeys(b for b in model.buffers()))
    clone_params = sum(p.numel() * p.element_size() for p in params) <= CLONE_LIMIT_BYTES
    with torch.no_grad():
        for p in params:
            copy = p.detach().clone() if clone_params and not p.is_meta else None
            data = p.data
            snap.tensors.append((p, data, p._version, data._version, copy))
            snap.grads.append((p, p.grad, p.grad.data if p.grad is not None else None))
            snap.requires_grad.append((p, p.requires_grad))
        for b in buffers:
            copy = b.detach().clone() if not b.is_meta else None
            data = b.data
            snap.tensors.append((b, data, b._version, data._version, copy))
    for module in model.modules():
        snap.training.append((module, module.training))
        for attr in ("_parameters", "_buffers"):
            slots = getattr(module, attr, None)
            if isinstance(slots, dict):
                snap.slots.append((slots, dict(slots)))
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if isinstance(hooks, dict):
                snap.hooks.append((hooks, dict(hooks)))
    global_hooks = nn.modules.module
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks"):
        hooks = getattr(global_hooks, attr, None)
        if isinstance(hooks, dict):
            snap.hooks.append((hooks, dict(hooks)))
    snap.cpu_rng = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap.cuda_rng = torch.cuda.get_rng_state_all()
    return snap


def _restore(snap: _Snapshot) -> None:
    for slots, saved in snap.slots:
        if slots.keys() != saved.keys() or any(slots[k] is not v for k, v in saved.items()):
            # e.g. a buffer that Module.to replaced by a moved copy
            slots.clear()
            slots.update(saved)
    with torch.no_grad():
        for tensor, data, version, data_version, copy in snap.tensors:
            if not _same_storage(tensor, data):
                tensor.data = data  # moved to another device: the original storage is intact
            if copy is not None:
                # Compared by value: kernels such as batch_norm update running statistics
                # in place without bumping any version counter.
                if not torch.equal(data, copy):
                    data.copy_(copy)
            elif tensor._version != version or data._version != data_version:
                snap.notes.append("a parameter was modified in place by the model's forward "
                                  "and is too large to have been copied")
    for p, grad, grad_data in snap.grads:
        if grad is not None and grad_data is not None and not _same_storage(grad, grad_data):
            grad.data = grad_data  # Module.to moves .grad in place too
        if p.grad is not grad:
            p.grad = grad
    for p, flag in snap.requires_grad:
        if p.requires_grad != flag:
            p.requires_grad_(flag)
    for module, flag in snap.training:
        if module.training != flag:
            module.training = flag
    for hooks, saved in snap.hooks:
        if hooks.keys() != saved.keys():
            hooks.clear()
            hooks.update(saved)
    if snap.cpu_rng is not None:
        torch.set_rng_state(snap.cpu_rng)
    if snap.cuda_rng is not None:
        torch.cuda.set_rng_state_all(snap.cuda_rng)


def _same_storage(tensor: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether ``tensor`` still views the storage ``data`` was taken from (same device too)."""
    if tensor.device != data.device or tensor.dtype != data.dtype or tensor.shape != data.shape:
        return False
    if tensor.is_meta or tensor.layout != torch.strided:
        return True  # no single storage pointer to compare (sparse gradients, meta)
    return bool(tensor.data_ptr() == data.data_ptr())


@contextmanager
def preserved(model: nn.Module, notes: list[str] | None = None) -> Iterator[None]:
    """Run the block, then restore the model and the RNG states, whatever happened."""
    snap = _take(model)
    try:
        yield
    finally:
        _restore(snap)
        if notes is not None:
            notes.extend(snap.notes)
