"""What-if copies of the traced graph: the changes a fix proposes, tried before it is offered.

A fix is applied to a *copy* of the traced graph (an activation swapped, an
``add`` inserted around a span, a normalisation inserted or moved) and/or to
the weights' moments (a re-initialisation, as moments the estimate reads in
place of the real weights'), never to the user's model. The static estimate
then re-runs on the copy, and the rules offer the fix only when the figure it
targets moves towards 1 (:func:`improves`). Everything here is the estimate's
arithmetic: nothing is allocated in the size of the model, so verifying a fix
on a 7B-parameter graph costs one more static pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
import torch

from gradscope.estimate.engine import PROBE_BATCHES, StaticEstimate, estimate
from gradscope.estimate.statistics import Mom
from gradscope.rules.health import log_distance
from gradscope.tracing.graph import Ref, TracedModel, iter_refs, node_record, set_record
from gradscope.tracing.ops import REINIT_KEYS


def _swap_refs(value: Any, old: str, new: str) -> Any:
    if isinstance(value, Ref):
        return Ref(new) if value.name == old else value
    if isinstance(value, tuple):
        return tuple(_swap_refs(v, old, new) for v in value)
    if isinstance(value, list):
        return [_swap_refs(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _swap_refs(v, old, new) for k, v in value.items()}
    return value


class Variant:
    """A copy of a traced graph with changes, and weight moments to use instead of the real ones."""

    def __init__(self, traced: TracedModel) -> None:
        self.base = traced
        self.graph: nx.DiGraph = traced.graph.copy()
        self.overrides: dict[int, Mom] = {}
        self.output = traced.output_node
        self._made = 0

    # -- graph edits ---------------------------------------------------------
    def replace_input(self, node: str, old: str, new: str) -> None:
        """Make ``node`` read ``new`` wherever it read ``old``."""
        data = node_record(self.graph, node)
        set_record(self.graph, dataclasses.replace(
            data, args=_swap_refs(data.args, old, new), kwargs=_swap_refs(data.kwargs, old, new),
            inputs=tuple(dict.fromkeys(new if r == old else r for r in data.inputs))))
        if self.graph.has_edge(old, node):
            self.graph.remove_edge(old, node)
        self.graph.add_edge(new, node)

    def redirect(self, old: str, new: str, keep: Iterable[str] = ()) -> None:
        """Every consumer of ``old`` (except ``keep``) reads ``new``; the output follows."""
        kept = set(keep) | {new}
        for succ in list(self.graph.successors(old)):
            if succ not in kept:
                self.replace_input(succ, old, new)
        if self.output == old:
            self.output = new

    def insert(self, stem: str, after: str, key: str, op: str, args: tuple[Any, ...],
               kwargs: dict[str, Any] | None = None, like: str | None = None) -> str:
        """A new compute node placed in forward order just after ``after``.

        It takes shape and dtype from ``like`` (default ``after``), and owns no
        weights: inserted normalisations start as the identity affine map,
        which is how PyTorch initialises them.
        """
        self._made += 1
        name = f"gradscope_fix_{stem}_{self._made}"
        template = node_record(self.graph, like or after)
        inputs = [r for r in iter_refs((args, kwargs or {})) if r in self.graph]
        self.graph.add_node(name, rec=dataclasses.replace(
            template, name=name,
            index=float(node_record(self.graph, after).index) + 1.0 - 1.0 / (self._made + 1.0),
            kind="call_function", role="compute", op=op, key=key, target=op, args=tuple(args),
            kwargs=dict(kwargs or {}), inputs=tuple(dict.fromkeys(inputs)), module=None,
            module_class=None, params=(), num_params=0, multi_output=False))
        for src in inputs:
            self.graph.add_edge(src, name)
        return name

    def add_residual(self, start: str, end: str, alpha: float = 1.0) -> str:
        """``start + alpha * end`` replaces ``end`` for everything downstream of it."""
        kwargs = {"alpha": alpha} if alpha != 1.0 else {}
        node = self.insert("residual", end, "add", "add", (Ref(start), Ref(end)), kwargs)
        self.redirect(end, node)
        return node

    def insert_norm(self, after: str, kind: str = "layer_norm") -> str:
        """A normalisation over the last dimension (channels for BatchNorm) after ``after``."""
        shape = node_record(self.graph, after).shape or [1]
        args: tuple[Any, ...] = (Ref(after), [shape[-1]]) if kind == "layer_norm" \
            else (Ref(after), None, None, None, None, True)
        node = self.insert("norm", after, kind, kind, args)
        self.redirect(after, node)
        return node

    def swap_activation(self, node: str, name: str) -> None:
        """Make ``node`` the activation ``name`` (PyTorch defaults) on its first input."""
        data = node_record(self.graph, node)
        signal = [r for r in data.inputs if node_record(self.graph, r).role != "param"]
        if not signal:
            return
        set_record(self.graph, dataclasses.replace(
            data, key=f"activation:{name}", op=name, kind="call_function",
            args=(Ref(signal[0]),), kwargs={}, inputs=(signal[0],), module=None,
            module_class=None))
        for pred in list(self.graph.predecessors(node)):
            if pred != signal[0]:
                self.graph.remove_edge(pred, node)

    def set_moments(self, tensor: torch.Tensor | None, moments: Mom) -> None:
        if tensor is not None:
            self.overrides[id(tensor)] = moments

    # -- result --------------------------------------------------------------
    def traced(self) -> TracedModel:
        return dataclasses.replace(self.base, graph=self.graph, output_node=self.output)

    def estimate(self, inputs: tuple[Any, ...],
                 declared: dict[int, Mom] | None = None,
                 batches: int = PROBE_BATCHES) -> StaticEstimate:
        """The static estimate of the variant, pooled over ``batches`` like the original's."""
        return estimate(self.traced(), inputs, declared, self.overrides, batches)


# ---------------------------------------------------------------------------
# Reading layers


def weight_and_bias(traced: TracedModel, node: str,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A weight layer's weight and bias tensors, whichever tracer made the node."""
    data = node_record(traced.graph, node)
    if data.kind == "call_module":
        module = traced.modules.get(data.module or "")
        if module is None:
            return None, None
        w = getattr(module, "weight", None)
        b = getattr(module, "bias", None)
        return (w if isinstance(w, torch.Tensor) else None,
                b if isinstance(b, torch.Tensor) else None)
    params = [traced.tensors.get(r) for r in data.inputs
              if node_record(traced.graph, r).role == "param"]
    tensors = [t for t in params if t is not None]
    if data.key == "addmm":  # addmm(bias, x, W): W is the 2-D one
        w = next((t for t in tensors if t.dim() == 2), None)
        b = next((t for t in tensors if t.dim() == 1), None)
        return w, b
    w = next((t for t in tensors if t.dim() >= 2), None)
    b = next((t for t in tensors if t.dim() == 1), None)
    return w, b


def node_parameters(traced: TracedModel, node: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter a node uses, whichever tracer made the node."""
    data = node_record(traced.graph, node)
    if data.kind == "call_module":
        module = traced.modules.get(data.module or "")
        return [] if module is None else list(module.named_parameters())
    found = []
    for ref in data.inputs:
        rec = node_record(traced.graph, ref)
        tensor = traced.tensors.get(ref)
        if rec.role == "param" and tensor is not None:
            found.append((rec.module or ref, tensor))
    return found


#: Largest |w| of a weight that starts "at zero" by design: layer scale (CaiT, ConvNeXt)
#: starts its per-channel gains at 1e-5 to 1e-6 for the same purpose as ReZero's 0.
NEAR_ZERO = 1e-4


def zero_initialised(traced: TracedModel, node: str) -> bool:
    """Whether a node's weights (its parameters other than biases) start at (near) zero.

    ReZero's and SkipInit's residual gains, Fixup's last branch layers, ViT's
    classification head and layer scale's 1e-6 gains start at zero by design: they
    receive a gradient (their input is not zero) and grow at the first updates, while
    everything behind them gets (almost) none until then.
    """
    weights = [t for name, t in node_parameters(traced, node)
               if not name.rsplit(".", 1)[-1].startswith("bias") and t.numel() > 0
               and not t.is_meta and t.is_floating_point()]
    return bool(weights) and all(float(t.detach().abs().max()) <= NEAR_ZERO for t in weights)


def fan_in(key: str, weight: torch.Tensor) -> int:
    if key == "addmm":
        return int(weight.shape[0])
    return int(math.prod(weight.shape[1:])) or 1


def weight_layers(traced: TracedModel) -> list[str]:
    """Linear and convolution nodes with real weight tensors, in forward order."""
    found = []
    for node in traced.order():
        data = node_record(traced.graph, node)
        if data.role == "compute" and data.key in REINIT_KEYS:
            w, _ = weight_and_bias(traced, node)
            if w is not None and w.dim() >= 2:
                found.append(node)
    return found


def hidden_activation(traced: TracedModel) -> str | None:
    """The model's most common hidden activation (ties: first in forward order)."""
    counts: dict[str, int] = {}
    for node in traced.order():
        key = node_record(traced.graph, node).key
        if key.startswith("activation:"):
            name = key.split(":", 1)[1]
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda k: counts[k])


def init_scale(activation: str | None) -> tuple[float, str]:
    """(gain^2 of Var W = gain^2 / fan_in, how the snippet says it) for an activation.

    ReLU family: Kaiming fan_in, gain^2 = 2 (He et al. 2015). tanh: the critical
    sigma_w = 1 with zero bias (Schoenholz et al. 2017: chi = sigma_w^2 E[tanh'^2] = 1
    at q* = 0). Anything else: LeCun, gain^2 = 1.
    """
    if activation in ("relu", "relu6", "rrelu", "prelu", "gelu", "silu", "mish", "hardswish",
                      "elu", "celu", "softplus"):
        return 2.0, "kaiming_normal_(w, mode=\"fan_in\", nonlinearity=\"relu\")"
    if activation == "leaky_relu":
        return 2.0 / (1.0 + 0.01 ** 2), \
            "kaiming_normal_(w, a=0.01, mode=\"fan_in\", nonlinearity=\"leaky_relu\")"
    if activation == "selu":
        return 1.0, "normal_(w, 0.0, 1.0 / math.sqrt(fan_in))  # LeCun normal, for SELU"
    if activation == "tanh":
        return 1.0, "normal_(w, 0.0, 1.0 / math.sqrt(fan_in))  # critical sigma_w = 1 for tanh"
    return 1.0, "normal_(w, 0.0, 1.0 / math.sqrt(fan_in))  # LeCun normal"


def reinitialise(variant: Variant, nodes: Sequence[str], gain_sq: float,
                 zero_bias: bool = True) -> None:
    """Weight moments of N(0, gain^2 / fan_in) (and zero biases) for ``nodes``."""
    traced = variant.base
    for node in nodes:
        w, b = weight_and_bias(traced, node)
        if w is None:
            continue
        variant.set_moments(w, (0.0, gain_sq / fan_in(node_record(traced.graph, node).key, w)))
        if zero_bias and b is not None:
            variant.set_moments(b, (0.0, 0.0))


# ---------------------------------------------------------------------------
# Judging


def improves(before: float | None, after: float | None, margin: float = 0.3) -> bool:
    """Whether ``after`` is closer to 1 than ``before`` by at least ``margin`` decades.

    Half a factor of two is noise for an estimate; a fix has to do better than
    that to be worth a user's time. A ratio that was unmeasurable (0: no
    gradient at all) and becomes finite improves.
    """
    b, a = log_distance(before), log_distance(after)
    if math.isinf(a):
        return False
    return math.isinf(b) or a <= b - margin


def extreme_health(est: StaticEstimate, nodes: Iterable[str], worst: str) -> float | None:
    """The lowest (``worst="low"``) or highest health over ``nodes`` in ``est``."""
    values = [est.health.get(n) for n in nodes]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if worst == "low" else max(finite)
