"""Probe: one real forward and backward on the target device, measured at every node.

The loss is ``<output, r>`` with ``r`` a fixed seeded Gaussian direction, so
dLoss/d(output) = r has RMS ~1 and every node's gradient is measured relative
to it. Gradients are collected with ``torch.autograd.grad`` and tensor hooks:
no ``.grad`` field of the user's model is written. Per-node sums of squares
are accumulated as tensors and read once at the end (no device sync per node).
The caller wraps this in :func:`gradscope.state.preserved`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.errors import ModelRunError
from gradscope.tracing.fx_tracers import NodeExecutionError
from gradscope.tracing.graph import TracedModel, tensor_leaves

DEAD_KEYS = frozenset({"activation:relu", "activation:relu6"})
#: Activation -> test on its output for "derivative below 1% of its maximum".
SATURATION_KEYS = frozenset({"activation:sigmoid", "activation:tanh", "activation:hardtanh",
                             "activation:hardsigmoid", "activation:softsign"})


@dataclass
class ProbeResult:
    """What one forward/backward measured, per graph node."""

    device: str
    batch_size: int | None
    loss: str
    seed: int
    mode: str
    output_grad_rms: float | None = None
    #: Squared norm of dLoss/d(node output), relative to the model output's.
    sq_norm: dict[str, float] = field(default_factory=dict)
    grad_rms: dict[str, float | None] = field(default_factory=dict)
    param_grad_ratio: dict[str, float | None] = field(default_factory=dict)
    param_grad_norm: dict[str, float | None] = field(default_factory=dict)
    #: ||first optimiser update|| / ||W|| per node, when a learning rate is given.
    update_ratio: dict[str, float | None] = field(default_factory=dict)
    lr: float | None = None
    optimizer: str | None = None
    dead_fraction: dict[str, float] = field(default_factory=dict)
    saturated_fraction: dict[str, float] = field(default_factory=dict)
    nonfinite_forward: list[str] = field(default_factory=list)
    nonfinite_backward: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Accumulator:
    """Tensor hooks and forward checks, kept as device tensors until the end."""

    def __init__(self, traced: TracedModel) -> None:
        self.graph = traced.graph
        self.sq: dict[str, list[torch.Tensor]] = {}
        self.numel: dict[str, int] = {}
        self.bad_grad: dict[str, list[torch.Tensor]] = {}
        self.bad_fwd: dict[str, torch.Tensor] = {}
        self.dead: dict[str, torch.Tensor] = {}
        self.saturated: dict[str, torch.Tensor] = {}
        self.forward_order: list[str] = []
        #: id -> (weak reference, version) of tensors already observed, to tell aliases.
        self.outputs: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def observe(self, name: str, value: Any) -> None:
        leaves = [t for t in tensor_leaves(value) if t.is_floating_point()]
        if not leaves:
            return
        self.forward_order.append(name)
        key = self.graph.nodes[name]["key"]
        with torch.no_grad():
            first = leaves[0].detach()
            self.bad_fwd[name] = ~torch.isfinite(first).all()
            if key in DEAD_KEYS and first.dim() >= 1 and first.shape[0] > 0:
                active = (first > 0).any(dim=0)
                self.dead[name] = 1.0 - active.float().mean()
            elif key in SATURATION_KEYS:
                self.saturated[name] = _saturated(key, first)
        self.numel[name] = sum(t.numel() for t in leaves)
        for leaf in leaves:
            seen = self.outputs.get(id(leaf))
            self.outputs[id(leaf)] = (weakref.ref(leaf), leaf._version)
            if seen is not None and seen[0]() is leaf and seen[1] == leaf._version:
                # An alias (nn.Identity, a no-op .to/.contiguous): the same tensor, not
                # modified, has no gradient of its own; measuring it would report the
                # total gradient of the tensor it aliases.
                continue
            if leaf.requires_grad:
                leaf.register_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            self.sq.setdefault(name, []).append(
                torch.linalg.vector_norm(g, 2, dtype=torch.float64) ** 2)
            self.bad_grad.setdefault(name, []).append(~torch.isfinite(g).all())

        return hook


def _saturated(key: str, y: torch.Tensor) -> torch.Tensor:
    y = y.float()
    if key == "activation:sigmoid":
        flat = y * (1 - y) < 0.01 * 0.25
    elif key == "activation:tanh":
        flat = 1 - y * y < 0.01
    elif key == "activation:softsign":
        flat = (1 - y.abs()) ** 2 < 0.01
    elif key == "activation:hardsigmoid":
        flat = (y <= 0) | (y >= 1)
    else:  # hardtanh: derivative 0 at the clamps
        flat = (y <= y.min()) | (y >= y.max())
    return flat.float().mean()


def _param_table(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _weights_of(names: Sequence[str], params: dict[str, nn.Parameter]) -> list[str]:
    """The node's weights: matrices and kernels, else whatever parameters it has."""
    known = [n for n in dict.fromkeys(names) if n in params]
    weights = [n for n in known if params[n].dim() >= 2 or n.rsplit(".", 1)[-1] == "weight"]
    return weights or known


def first_update_sq(grad: torch.Tensor, weight: torch.Tensor, lr: float, optimizer: str,
                    weight_decay: float = 0.0, eps: float = 1e-8) -> float:
    """Squared norm of the optimiser's first step, computed without taking it.

    SGD moves by lr * g. Adam's first step divides g by sqrt(g^2) + eps, so each
    element with a gradient moves by ~lr; AdamW adds decoupled decay lr * wd * W.
    """
    g = grad.detach().to(torch.float64)
    if optimizer == "sgd":
        step = lr * (g + weight_decay * weight.detach().to(torch.float64))
    else:
        if optimizer == "adam" and weight_decay:
            g = g + weight_decay * weight.detach().to(torch.float64)
        step = lr * g / (g.abs() + eps)
        if optimizer == "adamw" and weight_decay:
            step = step + lr * weight_decay * weight.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(step) ** 2)


def run_probe(model: nn.Module, traced: TracedModel, inputs: tuple[Any, ...], device: str,
              seed: int = 0, lr: float | None = None, optimizer: str = "sgd",
              weight_decay: float = 0.0) -> ProbeResult:
    """One forward and backward in train mode; the caller restores the model."""
    model.train()
    batch = None
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            batch = int(t.shape[0])
            break
    result = ProbeResult(device=device, batch_size=batch, loss="dot(output, seeded direction)",
                         seed=seed, mode="train", lr=lr, optimizer=optimizer if lr else None)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    probe_inputs = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t = t.detach().to(device).clone()
            if t.is_floating_point():
                t.requires_grad_(True)
        probe_inputs.append(t)
    acc = _Accumulator(traced)
    try:
        out = traced.runner.run(tuple(probe_inputs), acc.observe)
    except NodeExecutionError as exc:
        raise ModelRunError(f"the model raised during the probe at node {exc.node.name}: "
                            f"{type(exc.error).__name__}: {exc.error}",
                            "fix the forward, or use --no-probe for the static estimate") from exc
    except Exception as exc:
        raise ModelRunError(f"the model raised during the probe: {type(exc).__name__}: {exc}",
                            "fix the forward, or use --no-probe for the static estimate") from exc
    params = _param_table(model)
    wanted = [p for p in dict.fromkeys(params.values()) if p.requires_grad]
    grad_inputs = [t for t in probe_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not out.requires_grad:
        result.notes.append("the probed output does not depend on any trainable tensor: "
                            "no gradient to measure")
        _finish_forward(acc, result)
        return result
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    direction = torch.randn(out.shape, generator=generator, dtype=torch.float32)
    direction = direction.to(device=out.device, dtype=out.dtype)
    loss = (out * direction).sum()
    targets = grad_inputs + wanted
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    param_grads = dict(zip((id(p) for p in wanted), grads[len(grad_inputs):], strict=True))

    _finish_forward(acc, result)
    out_name = traced.output_node
    out_sq = torch.stack(acc.sq[out_name]).sum().item() if out_name in acc.sq else None
    if out_sq is None or not math.isfinite(out_sq) or out_sq <= 0:
        out_sq = float(torch.linalg.vector_norm(direction.double()) ** 2)
    out_numel = acc.numel.get(out_name, direction.numel())
    result.output_grad_rms = math.sqrt(out_sq / max(out_numel, 1))
    for name in acc.forward_order:
        if name in acc.sq:
            sq = float(torch.stack(acc.sq[name]).sum().item())
            bad = bool(torch.stack(acc.bad_grad[name]).any().item())
            if bad or not math.isfinite(sq):
                result.nonfinite_backward.append(name)
                result.sq_norm[name] = math.nan
                result.grad_rms[name] = math.nan
                continue
            result.sq_norm[name] = sq / out_sq
            n = acc.numel.get(name, 1)
            result.grad_rms[name] = math.sqrt(sq / n) / result.output_grad_rms
    by_id = {id(p): p for p in params.values()}
    for name in traced.graph.nodes:
        names = traced.graph.nodes[name]["params"]
        if not names or traced.graph.nodes[name]["role"] != "compute":
            continue
        weights = _weights_of(names, params)
        if not weights:
            continue
        w_sq = 0.0
        g_sq = 0.0
        u_sq = 0.0
        have_grad = False
        for wname in weights:
            p = params[wname]
            g = param_grads.get(id(p)) if id(p) in by_id else None
            w_sq += float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64) ** 2)
            if g is not None:
                have_grad = True
                g_sq += float(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2)
                if lr is not None:
                    u_sq += first_update_sq(g, p, lr, optimizer, weight_decay)
        if not have_grad and not any(params[w].requires_grad for w in weights):
            continue  # frozen weights: nothing to report
        result.param_grad_norm[name] = math.sqrt(g_sq)
        result.param_grad_ratio[name] = math.sqrt(g_sq) / math.sqrt(w_sq) if w_sq > 0 \
            else None
        if lr is not None:
            result.update_ratio[name] = math.sqrt(u_sq) / math.sqrt(w_sq) if w_sq > 0 else None
    return result


def _finish_forward(acc: _Accumulator, result: ProbeResult) -> None:
    for name in acc.forward_order:
        if bool(acc.bad_fwd[name].item()):
            result.nonfinite_forward.append(name)
        if name in acc.dead:
            result.dead_fraction[name] = float(acc.dead[name].item())
        if name in acc.saturated:
            result.saturated_fraction[name] = float(acc.saturated[name].item())
