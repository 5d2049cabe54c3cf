"""The traced model: a networkx DiGraph plus what is needed to run and measure it.

Whatever tracer produced it, a :class:`TracedModel` has one node per tensor
operation with the same attributes, so that the estimator, the probe and the
report never branch on the tracer. The fx-based tracers build it with
:func:`graph_from_fx`; the runtime recorder builds it directly.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from gradscope.records import TraceAttempt
from gradscope.tracing import ops
from gradscope.tracing.nodes import NodeRecord, node_record, set_record
from gradscope.tracing.ops import canonical_activation

#: Observer the runners call with (node name, node output) during a forward.
Observer = Callable[[str, Any], None]


@dataclass(frozen=True)
class Ref:
    """A reference to another node's output inside a node's recorded arguments."""

    name: str


class Runner:
    """Executes the traced model on real inputs, reporting each node's output.

    One per tracer: fx graphs run through an Interpreter, the runtime graph by
    re-running the model under the recorder. ``run`` returns the tensor the
    probe differentiates (the selected model output).
    """

    def run(self, inputs: tuple[Any, ...], observe: Observer) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class TracedModel:
    """A model's graph in the form every later stage reads."""

    graph: nx.DiGraph
    method: str
    attempts: list[TraceAttempt]
    output_node: str
    output_desc: str
    runner: Runner
    #: Parameter, buffer and constant tensors, by the graph node that stands for them.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Modules kept whole, by their qualified path.
    modules: dict[str, nn.Module] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Measured (mean, second moment) of weight tensors by (id, version), shared by every
    #: static estimate of this graph and of its what-if copies (which share the tensors):
    #: each verified fix re-estimates the graph, and reading the weights is the hot spot.
    #: Each entry holds its tensor, so an id is never read for another (temporaries).
    #: Keys: ``gradscope.estimate.statistics._cache_key`` (views by the tensor they view).
    measured: dict[tuple[Hashable, ...], tuple[torch.Tensor, tuple[float, float]]] = field(
        default_factory=dict, repr=False)
    #: Facts read from weight values alone (``gradscope.estimate.tied``'s fingerprints and
    #: equalities), shared like ``measured``: the search for equal weights runs again in
    #: every fix's re-estimate, on the same weights. Keyed by the ids and versions of the
    #: tensors read; each entry holds them, so an id is never read for another tensor.
    weight_facts: dict[tuple[Hashable, ...], tuple[tuple[torch.Tensor, ...], Any]] = field(
        default_factory=dict, repr=False)

    def node(self, name: str) -> NodeRecord:
        """The record of one node."""
        return node_record(self.graph, name)

    def records(self) -> list[NodeRecord]:
        """Every node's record in forward order."""
        return [self.node(n) for n in self.order()]

    def order(self) -> list[str]:
        """Forward order: the order nodes were created in, which is topological."""
        graph = self.graph
        return sorted(graph.nodes, key=lambda n: graph.nodes[n]["rec"].index)

    def compute_nodes(self) -> list[str]:
        """Nodes that are reported as layers: inputs and operations, not weights or the sink."""
        return [n for n in self.order() if self.node(n).role in ("input", "compute")]


# ---------------------------------------------------------------------------
# Source locations

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(torch.__file__)
_GRADSCOPE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_library_file(path: str) -> bool:
    """Frames in torch or gradscope itself are never "the user's line"."""
    return _is_library_path(path if os.path.isabs(path) else os.path.abspath(path))


@functools.lru_cache(maxsize=4096)
def _is_library_path(path: str) -> bool:
    # Cached: every traced node's stack trace repeats the same few files.
    path = os.path.abspath(path)
    return path.startswith(_TORCH_DIR + os.sep) or path.startswith(_GRADSCOPE_DIR + os.sep)


def user_location(skip: int = 1, stop: FrameType | None = None,
                  ) -> tuple[str | None, int | None]:
    """The innermost frame of the running stack that is the user's code (not torch's or ours).

    Read from the live frames while a tracer records a node: cheap, where asking torch.fx
    for whole stack traces (``record_stack_traces``) symbolises every frame of every node
    and, the first time in a process, imports torch's compiler stack (1.7 s; issue 15).
    Frames from ``stop`` outwards (the code that started the trace) are not the model's.
    """
    frame: FrameType | None = sys._getframe(skip + 1)
    while frame is not None and frame is not stop:  # ``stop``: where the tracing began
        path = frame.f_code.co_filename
        if not is_library_file(path) and not path.startswith("<"):
            return path, frame.f_lineno
        frame = frame.f_back
    return None, None


def user_frame(stack_trace: str | None) -> tuple[str | None, int | None]:
    """The innermost frame of a recorded stack trace that lies outside torch and gradscope."""
    if not stack_trace:
        return None, None
    found: tuple[str | None, int | None] = (None, None)
    for match in _FRAME.finditer(stack_trace):
        path, line = match.group(1), int(match.group(2))
        if not is_library_file(path) and not path.startswith("<"):
            found = (path, line)
    return found


# ---------------------------------------------------------------------------
# Values and shapes


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) detached and moved to
    ``device``; anything else as it is. For batches and targets handed to a model copy."""
    return torch.utils._pytree.tree_map(
        lambda v: v.detach().to(device) if isinstance(v, torch.Tensor) else v, value)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a (possibly nested) output, in order.

    A plain tensor (most ops' output) is its own only leaf: answered without pytree, whose
    flattening was a tenth of the runtime recorder's replay in the probe (issue 15).
    Subclasses go through pytree, which may know them as containers.
    """
    if type(value) in _PLAIN_TENSORS:
        return [value]
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [v for v in leaves if isinstance(v, torch.Tensor)]


#: Tensor types that pytree never flattens further.
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def describe_value(value: Any) -> tuple[list[int] | None, str | None, bool]:
    """(shape, dtype, is_tensor) of a node's value; tuples report their first tensor."""
    leaves = tensor_leaves(value)
    if not leaves:
        return None, None, False
    first = leaves[0]
    try:
        shape = [int(s) for s in first.shape]
    except (TypeError, ValueError):  # symbolic sizes
        shape = None
    return shape, str(first.dtype).replace("torch.", ""), True


def is_float_dtype(dtype: str | None) -> bool:
    return dtype is not None and (dtype.startswith("float") or dtype.startswith("bfloat")
                                  or dtype.startswith("complex"))


def map_refs(value: Any) -> Any:
    """fx arguments with Nodes replaced by :class:`Ref`, so graphs hold no fx objects."""
    return fx.node.map_arg(value, lambda n: Ref(n.name))  # type: ignore[arg-type,return-value]


def iter_refs(value: Any) -> Iterator[str]:
    """Names of the nodes referenced anywhere in recorded arguments, in order."""
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_refs(v)
    elif isinstance(value, slice):
        yield from iter_refs((value.start, value.stop, value.step))


# ---------------------------------------------------------------------------
# Building the graph


def op_naming(kind: str, target: Any, module: nn.Module | None) -> tuple[str, str]:
    """(display op, estimator key) for a node."""
    if kind == "call_module" and module is not None:
        cls = type(module).__name__
        return cls, ops.module_key(cls, canonical_activation(cls))
    name = ops.function_name(target)
    activation = canonical_activation(str(target)) or canonical_activation(name)
    return name, ops.canonical_key(name, activation)


def add_node(
    graph: nx.DiGraph,
    name: str,
    *,
    kind: str,
    role: str,
    target: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    module_path: str | None = None,
    module: nn.Module | None = None,
    value: Any = None,
    file: str | None = None,
    line: int | None = None,
    params: Iterable[str] = (),
    num_params: int = 0,
) -> None:
    """Add one node with the attributes every stage relies on, and its input edges."""
    op, key = op_naming(kind, target, module)
    if role == "input":
        op, key = "input", "input"
    elif role == "param":
        op, key = "parameter", "param"
    shape, dtype, is_tensor = describe_value(value)
    kwargs = kwargs or {}
    inputs = [r for r in iter_refs((args, kwargs)) if r in graph]
    record = NodeRecord(
        name=name,
        index=graph.number_of_nodes(),
        kind=kind,
        role=role,
        op=op,
        key=key,
        target=str(target) if not isinstance(target, str) else target,
        args=tuple(args),
        kwargs=kwargs,
        inputs=tuple(dict.fromkeys(inputs)),
        module=module_path or None,
        module_class=type(module).__name__ if module is not None else None,
        shape=tuple(shape) if shape is not None else None,
        dtype=dtype,
        is_tensor=is_tensor,
        is_float=is_float_dtype(dtype),
        multi_output=len(tensor_leaves(value)) > 1 or isinstance(value, (tuple, list)),
        file=file,
        line=line,
        params=tuple(params),
        num_params=int(num_params),
    )
    graph.add_node(name, rec=record)
    for src in inputs:
        graph.add_edge(src, name)


def compute_depths(graph: nx.DiGraph) -> None:
    """Depth = longest path from an input, counting operations; weights don't add depth."""
    depth: dict[str, int] = {}
    for name in nx.topological_sort(graph):
        rec = node_record(graph, name)
        if rec.role in ("input", "param"):
            depth[name] = 0
        else:
            preds = [p for p in graph.predecessors(name) if node_record(graph, p).role != "param"]
            depth[name] = 1 + max((depth[p] for p in preds), default=-1)
        if rec.depth != depth[name]:
            set_record(graph, replace(rec, depth=depth[name]))


def module_path_from_stack(meta: dict[str, Any], strip_prefix: str = "") -> str | None:
    """Innermost module path from ``nn_module_stack`` (export and recent fx tracers)."""
    stack = meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = path.replace("L['self'].", "").replace("L__self__.", "")
    if strip_prefix and path.startswith(strip_prefix):
        path = path[len(strip_prefix):]
    elif strip_prefix and path == strip_prefix.rstrip("."):
        path = ""
    return path or None


def _weight_transform(node: fx.Node, refs: list[str], graph: nx.DiGraph,
                      tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The value of a node computed from weights alone, or None if it reads anything else.

    Evaluated on the real weights (the fx values may be fake tensors), so the estimate
    reads the moments of the weight the layer actually multiplies by.
    """
    if not refs or any(r not in graph or node_record(graph, r).role != "param"
                       or r not in tensors for r in refs):
        return None
    args = fx.node.map_arg(node.args, lambda n: tensors[n.name])
    kwargs = fx.node.map_arg(dict(node.kwargs), lambda n: tensors[n.name])
    try:
        with torch.no_grad():
            if node.op == "call_method":
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            elif node.op == "call_function" and callable(node.target):
                value = node.target(*args, **kwargs)
            else:
                return None
    except Exception:  # noqa: BLE001 - not evaluable on its own: keep it an operation
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    value = value.detach()
    mark_weight_source(value, ops.function_name(node.target), [tensors[r] for r in refs])
    return value


def mark_weight_source(value: torch.Tensor, op: str, sources: list[torch.Tensor]) -> None:
    """Point a value-preserving transform of one weight at that weight (WEIGHT_SOURCE).

    On the meta device the transform has no values: the estimate reads the declared
    moments of the weight it was made from (gradscope.estimate.statistics).
    """
    if len(sources) == 1 and op in _SAME_VALUES:
        setattr(value, WEIGHT_SOURCE, sources[0])


#: Attribute set on a value-preserving transform of a weight (``W.T``, ``w.float()``),
#: pointing at the weight it was made from: on the meta device the estimate reads the
#: weight's declared moments through it (``gradscope.estimate.statistics``).
WEIGHT_SOURCE = "_gradscope_source"

#: Transforms of a weight that keep its values (only their order, shape or dtype change).
_SAME_VALUES = frozenset({"t", "transpose", "permute", "view", "reshape", "contiguous",
                          "clone", "detach", "to", "float", "half", "bfloat16", "double",
                          "_to_copy", "expand", "squeeze", "unsqueeze", "flatten",
                          "numpy_T", "T", "mT", "alias"})


def graph_from_fx(
    gm: fx.GraphModule,
    *,
    values: dict[str, Any],
    roles: dict[str, str],
    tensors: dict[str, torch.Tensor],
    root: nn.Module,
    module_prefix: str = "",
    param_names: dict[str, str] | None = None,
) -> tuple[nx.DiGraph, str | None]:
    """Convert an fx graph (symbolic or exported) to the common networkx form.

    ``values`` maps node names to (fake or real) example outputs for shapes;
    ``roles`` marks placeholders as "input" or "param"; ``param_names`` gives
    the user-facing name of lifted parameters. Returns the graph and the name
    of the fx output node's first argument structure holder (unused: the
    caller selects the output).
    """
    graph = nx.DiGraph()
    param_names = param_names or {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        value = values.get(node.name)
        file, line = user_frame(node.meta.get("stack_trace") or getattr(node, "stack_trace", None))
        if node.op == "placeholder":
            role = roles.get(node.name, "input")
            add_node(graph, node.name, kind="placeholder", role=role, target=node.target,
                     value=value, module_path=param_names.get(node.name))
            if role == "param" and node.name in tensors:
                set_record(graph, replace(node_record(graph, node.name),
                                          num_params=tensors[node.name].numel()))
            continue
        if node.op == "get_attr":
            add_node(graph, node.name, kind="get_attr", role="param", target=node.target,
                     value=value, module_path=str(node.target))
            tensor = tensors.get(node.name)
            set_record(graph, replace(node_record(graph, node.name),
                                      num_params=tensor.numel() if tensor is not None else 0))
            continue
        name = ops.function_name(node.target) if node.op != "call_module" else ""
        if name in ops.IGNORED:
            continue
        _, _, is_tensor = describe_value(value)
        if not is_tensor:
            continue  # shape arithmetic and other non-tensor values carry no gradient
        module: nn.Module | None = None
        params: list[str] = []
        num_params = 0
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            path = str(node.target)
            if module_prefix and path.startswith(module_prefix):
                path = path[len(module_prefix):]
            for pname, p in module.named_parameters():
                params.append(f"{path}.{pname}")
                num_params += p.numel()
        else:
            path = module_path_from_stack(node.meta, module_prefix) or ""
        args = map_refs(node.args)
        kwargs = map_refs(dict(node.kwargs))
        refs = list(iter_refs((args, kwargs)))
        weight = _weight_transform(node, refs, graph, tensors) \
            if node.op != "call_module" else None
        if weight is not None:
            # ``w.float()``, ``w.T``, ``1 + w``: a computation on weights alone is part of
            # the weight, not a layer; its consumer is the layer that trains.
            tensors[node.name] = weight
            add_node(graph, node.name, kind=node.op, role="param", target=node.target,
                     args=args, kwargs=kwargs, module_path=node_record(graph, refs[0]).module,
                     value=value, file=file, line=line)
            set_record(graph, replace(node_record(graph, node.name), num_params=sum(
                node_record(graph, r).num_params for r in dict.fromkeys(refs))))
            continue
        for ref in refs:
            if ref in graph and node_record(graph, ref).role == "param":
                params.append(node_record(graph, ref).module or ref)
                num_params += node_record(graph, ref).num_params
        add_node(graph, node.name, kind=node.op, role="compute", target=node.target,
                 args=args, kwargs=kwargs, module_path=path, module=module, value=value,
                 file=file, line=line, params=params, num_params=num_params)
    compute_depths(graph)
    return graph, None
