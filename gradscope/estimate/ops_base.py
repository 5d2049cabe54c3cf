"""What an op rule sees, and the registry the op catalogue fills.

The estimate is one sweep over the graph (``gradscope.estimate.engine``) that
asks, for each node, the rule of the node's canonical key (``NodeRecord.key``,
named in ``gradscope.tracing.ops``): a *forward* rule returns the output's
(mean, second moment), a *backward* rule the S-gain (squared-norm gain of the
gradient, ``docs/static-estimate.md``) to each input. Rules register with
:func:`rule` in the ``ops_*`` modules, one module per op family; they read the
node only through :class:`Ctx` (its arguments, its inputs' moments, its
weights' statistics, shapes), and the sweep's state through
:class:`SweepState`. Keeping both here lets the families and the engine depend
on this module and never on each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import torch

from gradscope.estimate.statistics import UNIT, Mom
from gradscope.tracing.graph import Ref, TracedModel, node_record


class SweepState:
    """What the sweep has computed so far: what the rules read (and the activation rule adds to)."""

    def __init__(self, traced: TracedModel, inputs: tuple[Any, ...]) -> None:
        self.traced = traced
        self.graph: nx.DiGraph = traced.graph
        self.inputs = inputs
        self.moments: dict[str, Mom | None] = {}
        #: Variance of the per-unit (per-channel) means across units: the part of
        #: a node's variance that BatchNorm removes and that shifts activations.
        self.spread: dict[str, float] = {}
        #: Spread of the node being evaluated, when its rule computes it (activations).
        self.pending_spread: float | None = None
        #: The coherent share of each node's gradient (``gradscope.estimate.coherence``),
        #: set by the backward sweep before the node's rule runs: attention reads it.
        self.grad_coherence: dict[str, Any] = {}
        #: The token-mean share of each node's output (``gradscope.estimate.collapse``),
        #: set by the forward sweep after the node's rule: attention reads its values'.
        self.token_share: dict[str, Any] = {}
        #: Recurrent unrolls by node (gradscope.estimate.recurrent.RecurrentEstimate).
        self.recurrent: dict[str, Any] = {}
        #: Cells called in a loop (``gradscope.estimate.ops_recurrent``): each call's step and
        #: chain by node, the cells and the chains' shared gains by their own keys.
        self.chains: dict[Any, Any] = {}
        #: The backward sweep's S so far: final at every node downstream of the one whose
        #: backward rule runs (the sweep goes in reverse topological order).
        self.backward_sq: dict[str, float] = {}

    def tensor_of(self, node: str) -> torch.Tensor | None:
        return self.traced.tensors.get(node)


class Ctx:
    """What an op rule may read about its node: args, moments, weights, shapes."""

    def __init__(self, est: SweepState, name: str) -> None:
        self.est = est
        self.name = name
        self.data = node_record(est.graph, name)
        self.args: tuple[Any, ...] = tuple(self.data.args)
        self.kwargs: dict[str, Any] = dict(self.data.kwargs)
        # Any: nn.Module's __getattr__ types every attribute as Tensor | Module.
        self.module: Any = est.traced.modules.get(self.data.module or "") \
            if self.data.kind == "call_module" else None

    # arguments -----------------------------------------------------------
    def arg(self, index: int, key: str | None = None, default: Any = None) -> Any:
        if key is not None and key in self.kwargs:
            return self.kwargs[key]
        return self.args[index] if index < len(self.args) else default

    def tensor_refs(self) -> list[str]:
        """Referenced float nodes in argument order (weights included)."""
        return [r for r in self.data.inputs if node_record(self.est.graph, r).is_float]

    def activations_in(self) -> list[str]:
        """Referenced float nodes that are not weights: the signal inputs."""
        return [r for r in self.tensor_refs() if node_record(self.est.graph, r).role != "param"]

    def first(self) -> str | None:
        ins = self.activations_in()
        return ins[0] if ins else None

    def mom(self, value: Any) -> Mom | None:
        """Moments of an argument: a node reference or a Python number."""
        if isinstance(value, Ref):
            found = self.est.moments.get(value.name)
            if found is None and node_record(self.est.graph, value.name).is_float:
                return UNIT  # unknown float values: the unit-variance prior
            return found
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value), float(value) ** 2
        return None

    def shape(self, ref: str | None = None) -> Sequence[int] | None:
        return node_record(self.est.graph, ref or self.name).shape

    # weights -------------------------------------------------------------
    def weight(self, attr: str = "weight", index: int | None = None) -> torch.Tensor | None:
        """A weight tensor: the module's attribute, else the ``index``-th argument's tensor."""
        if self.module is not None:
            w = getattr(self.module, attr, None)
            return w if isinstance(w, torch.Tensor) else None
        if index is not None:
            ref = self.arg(index, attr)
            if isinstance(ref, Ref):
                return self.est.tensor_of(ref.name)
        return None

    def param_by_suffix(self, suffix: str) -> torch.Tensor | None:
        """A weight among the referenced parameters whose name ends with ``suffix``."""
        if self.module is not None:
            w = getattr(self.module, suffix, None)
            return w if isinstance(w, torch.Tensor) else None
        for ref in self.data.inputs:
            node = node_record(self.est.graph, ref)
            if node.role == "param" and str(node.module or ref).endswith(suffix):
                return self.est.tensor_of(ref)
        return None




# ---------------------------------------------------------------------------
# The registry: forward returns the output moments; backward returns S-gains per input.

Forward = Callable[[Ctx], "Mom | None"]
Backward = Callable[[Ctx], "dict[str, float]"]
FORWARD: dict[str, Forward] = {}
BACKWARD: dict[str, Backward] = {}
#: Keys whose rule says which part of its gains is averaging by design (``structural``):
#: the engine's structural sweep applies those parts only (``gradscope.estimate.engine``).
STRUCTURAL: dict[str, Callable[[Ctx], dict[str, float]]] = {}


def rule(*keys: str) -> Callable[[Any], Any]:
    """Class decorator: register its static ``forward`` and ``backward`` for ``keys``, and
    its ``structural`` where it has one (the averaging part of its backward gains)."""

    def deco(cls: Any) -> Any:
        for key in keys:
            FORWARD[key] = cls.forward
            BACKWARD[key] = cls.backward
            if hasattr(cls, "structural"):
                STRUCTURAL[key] = cls.structural
        return cls

    return deco


def pass_forward(ctx: Ctx) -> Mom | None:
    """The first signal input's moments, unchanged (also the fallback for unknown ops)."""
    first = ctx.first()
    return ctx.est.moments.get(first) if first else None


def pass_backward(ctx: Ctx) -> dict[str, float]:
    """Gain 1 to every signal input (also the fallback for unknown ops)."""
    return {r: 1.0 for r in ctx.activations_in()}

