"""The last-resort tracer: record the graph while the model really runs.

When neither symbolic tracer can follow the model (data-dependent branches,
``.item()`` in forward), one real forward is watched: module hooks mark the
modules kept whole, and a ``TorchFunctionMode`` sees every torch function and
tensor method called between them. Edges follow tensor identity. The graph is
the path the example inputs took; other branches are not in it, which the
report says. The same recorder runs again during the probe, naming nodes the
same way, so measurements land on the recorded nodes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import FrameType
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradscope.outputs import select_output
from gradscope.records import TraceAttempt
from gradscope.tracing import ops
from gradscope.tracing.graph import (
    Observer,
    Ref,
    Runner,
    TracedModel,
    add_node,
    compute_depths,
    mark_weight_source,
    node_record,
    set_record,
    tensor_leaves,
    user_location,
)


class ModelForwardError(RuntimeError):
    """The model's own forward raised while the runtime tracer watched it.

    Kept apart from gradscope's failures so that only the model's errors are
    reported as "the model rejects these inputs".
    """

    def __init__(self, error: BaseException, module: str | None = None,
                 location: tuple[str | None, int | None] = (None, None)) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        #: Where in the model it raised: the module running and the user's source line.
        self.where = _where(error, module, location)

    @classmethod
    def at_node(cls, node: Any, error: BaseException) -> ModelForwardError:
        """The model's error raised while an fx graph ran ``node``: its module and line."""
        from gradscope.tracing.graph import user_frame

        module = str(node.target) if node.op == "call_module" else None
        stack = node.meta.get("nn_module_stack")
        if module is None and stack:
            module = str(list(stack.values())[-1][0])
        return cls(error, module, user_frame(node.meta.get("stack_trace")))


def _where(error: BaseException, module: str | None,
           location: tuple[str | None, int | None]) -> str | None:
    """``in module `layers.3` (model.py:42)``: the module that was running when ``error``
    was raised and the innermost line of the user's code in its traceback (else
    ``location``, the line that called the op, when the traceback holds none)."""
    import os

    from gradscope.tracing.graph import is_library_file

    file, line = location
    tb = error.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith("<") and not is_library_file(path):
            file, line = path, tb.tb_lineno
        tb = tb.tb_next
    parts = []
    if module is not None:
        parts.append(f"in module `{module or '(the model itself)'}`")
    if file is not None:
        parts.append(f"({os.path.basename(file)}:{line})")
    return " ".join(parts) or None


def _is_whole(module: nn.Module) -> bool:
    """Same rule as the symbolic tracer: childless torch.nn modules and MHA stay whole."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2:
        cls = cls.__bases__[1]  # fully_shard's FSDP<Class>(FSDPModule, Class): the class
    if cls.__name__ in ops.LEAF_WITH_CHILDREN:
        return True
    in_torch = cls.__module__.startswith(("torch.nn", "torch.ao.nn"))
    return in_torch and next(module.children(), None) is None


def _caller_location(stop: FrameType | None) -> tuple[str | None, int | None]:
    """The user's frame that called into the recorder (two frames up: hook, then here),
    looking no further out than ``stop``, the frame that started the forward: a model
    made of torch modules alone (``nn.Sequential``) has no frame of its own, and the
    callers' frames (a CLI, a test) are not its source."""
    return user_location(skip=2, stop=stop)


class _Recorder(TorchFunctionMode):
    """Builds (or replays) the graph of one forward."""

    def __init__(self, model: nn.Module, graph: nx.DiGraph | None, observe: Observer | None,
                 skip_distributed: bool = False) -> None:
        super().__init__()
        #: Ignore the ops torch.distributed runs inside the model's hooks (FSDP's
        #: all-gathers and copies): not the model's, and they would shift node names.
        self.skip_distributed = skip_distributed
        self.model = model
        self.building = graph is None
        self.graph = graph if graph is not None else nx.DiGraph()
        self.observe = observe
        self.producer: dict[int, str] = {}
        self.keep: list[Any] = []  # keeps recorded tensors alive so ids stay unique
        self.counts: dict[str, int] = {}
        self.inside_whole = 0
        #: Paths of the modules traced into, innermost last (the root's is "").
        self.stack: list[str] = []
        #: The module kept whole that is running (meaningful while ``inside_whole``).
        self.whole = ""
        self.tensors: dict[str, torch.Tensor] = {}
        #: Weights by id: only the build reads them (a replay names nodes without them).
        self.param_ids: dict[int, str] = {}
        if self.building:
            self.param_ids = {id(p): n
                              for n, p in model.named_parameters(remove_duplicate=False)}
            self.param_ids.update(
                {id(b): n for n, b in model.named_buffers(remove_duplicate=False)})
        self.paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
        self.modules: dict[str, nn.Module] = {}
        #: The frame that runs the model's forward: where looking for the user's code ends.
        self.stop: FrameType | None = sys._getframe(1)
        #: ``ops.function_name`` by function, for this forward: the same few functions are
        #: called thousands of times (a replay pays for it on every probe batch).
        self.names: dict[Any, str] = {}

    # naming ---------------------------------------------------------------
    def _function_name(self, func: Any) -> str:
        try:
            name = self.names.get(func)
        except TypeError:  # an unhashable callable: named every time
            return ops.function_name(func)
        if name is None:
            name = self.names[func] = ops.function_name(func)
        return name

    def _fresh(self, base: str) -> str:
        base = base.replace(".", "_") or "node"
        count = self.counts.get(base, 0)
        self.counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def _refs(self, value: Any) -> Any:
        """Arguments with recorded tensors replaced by references to their producers."""
        if isinstance(value, torch.Tensor):
            name = self.producer.get(id(value))
            if name is None and id(value) in self.param_ids:
                name = self._param_node(value)
            return Ref(name) if name is not None else ("<tensor>", tuple(value.shape))
        if isinstance(value, (list, tuple)):
            return type(value)(self._refs(v) for v in value) if not hasattr(value, "_fields") \
                else tuple(self._refs(v) for v in value)
        if isinstance(value, dict):
            return {k: self._refs(v) for k, v in value.items()}
        return value

    def _param_node(self, tensor: torch.Tensor) -> str:
        pname = self.param_ids[id(tensor)]
        node = "p_" + pname.replace(".", "_")
        if node not in self.graph and self.building:
            add_node(self.graph, node, kind="get_attr", role="param", target=pname,
                     value=tensor, module_path=pname)
            set_record(self.graph, replace(node_record(self.graph, node),
                                           num_params=tensor.numel()))
        self.tensors[node] = tensor
        self.producer[id(tensor)] = node
        self.keep.append(tensor)
        return node

    def _record(self, name: str, value: Any, **attrs: Any) -> None:
        if not self.building:
            self._replay(name, value)
            return
        add_node(self.graph, name, value=value, **attrs)
        for leaf in tensor_leaves(value):
            self.producer[id(leaf)] = name
            self.keep.append(leaf)
        if node_record(self.graph, name).role == "param":
            if isinstance(value, torch.Tensor):
                self.tensors[name] = value.detach()
            return  # part of a weight: not a layer the probe measures
        if self.observe is not None:
            self.observe(name, value)

    def _replay(self, name: str, value: Any) -> None:
        """A replayed node's output, named as the build named it, handed to the observer.

        All the probe needs of a replay is each node's name and output: the name comes
        from the same ``_fresh`` counters as in the build (every path through
        ``__torch_function__`` and ``post_hook`` takes one name from the same base, so the
        names do not depend on the build-only work: caller lines, argument references,
        weight folding, producers), and whether the node is a weight, the recorded graph
        says. Producers are not tracked, so nothing is kept alive for their ids.
        """
        if name not in self.graph:
            return  # a branch the recorded graph does not have: measured nowhere
        if node_record(self.graph, name).role == "param":
            if isinstance(value, torch.Tensor):
                # Part of a weight: not a layer the probe measures. The build stored its
                # ``detach()``, which a module hook (outside ``__torch_function__``) runs
                # under the mode: a ``detach`` node of its own that later names count, so
                # the replay detaches too.
                self.tensors[name] = value.detach()
            return
        if self.observe is None:
            return
        # The observer's checks (``is_floating_point``, hooks, sums) are not the model's
        # ops: outside the mode they cost nothing here and cannot shift replayed names.
        with torch._C.DisableTorchFunction():
            self.observe(name, value)

    def _weight_only(self, args: Any) -> list[str] | None:
        """The weight nodes ``args`` are computed from, or None if they read anything else.

        A computation on weights alone (``w.T``, ``w.float()``, DeBERTa's LayerNorm of its
        relative-position table) is part of the weight its consumer multiplies by, not a
        layer, as the fx conversion (``graph.graph_from_fx``) folds it for torch.export:
        the two tracers then agree on which layers there are.
        """
        refs: list[str] = []
        for leaf in tensor_leaves(args):
            name = self.producer.get(id(leaf))
            if name is None and id(leaf) in self.param_ids:
                name = self._param_node(leaf)
            if name is None or name not in self.graph \
                    or node_record(self.graph, name).role != "param":
                return None
            refs.append(name)
        return list(dict.fromkeys(refs)) or None

    def _record_weight(self, base: str, value: Any, refs: list[str], **attrs: Any) -> None:
        name = self._fresh(base)
        self._record(name, value, role="param",
                     module_path=node_record(self.graph, refs[0]).module,
                     num_params=sum(node_record(self.graph, r).num_params for r in refs),
                     **attrs)
        stored = self.tensors.get(name)
        if stored is not None and attrs.get("kind") == "call_function" \
                and all(r in self.tensors for r in refs):
            mark_weight_source(stored, base, [self.tensors[r] for r in refs])

    # inputs ---------------------------------------------------------------
    def add_inputs(self, inputs: tuple[Any, ...]) -> None:
        for i, value in enumerate(inputs):
            self._record(f"input_{i}", value, kind="placeholder", role="input",
                         target=f"input_{i}")

    # modules --------------------------------------------------------------
    def running(self) -> str:
        """The path of the innermost module running now ("" for the model itself)."""
        if self.inside_whole:
            return self.whole
        return self.stack[-1] if self.stack else ""

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """A module traced into: the ops called until it returns are its own (the module
        path export reads from ``nn_module_stack``; the report's per-module view)."""
        if not self.inside_whole:
            self.stack.append(self.paths.get(id(module), type(module).__name__))

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.inside_whole and self.stack:
            self.stack.pop()

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.inside_whole:
            self.whole = self.paths.get(id(module), type(module).__name__)
        self.inside_whole += 1

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.inside_whole -= 1
        if self.inside_whole:
            return
        path = self.paths.get(id(module), type(module).__name__)
        if not self.building:
            self._replay(self._fresh(path), output)  # both branches below name it so
            return
        file, line = _caller_location(self.stop)
        weights = self._weight_only(args) if isinstance(output, torch.Tensor) else None
        if weights is not None and any(node_record(self.graph, w).num_params for w in weights):
            # A module applied to weights (DeBERTa's LayerNorm of its position table) is
            # part of them; one applied to constants alone (an Embedding of arange
            # positions, GPT-2's wpe) is a layer, as export's graph has it.
            own = [self._param_node(p) for p in module.parameters()]
            self._record_weight(path, output, weights + own, kind="call_module",
                                target=path, args=self._refs(args), file=file, line=line)
            return
        params = [f"{path}.{n}" for n, _ in module.named_parameters()]
        self.modules[path] = module
        self._record(self._fresh(path), output, kind="call_module", role="compute",
                     target=path, args=self._refs(args), module_path=path, module=module,
                     file=file, line=line, params=params,
                     num_params=sum(p.numel() for p in module.parameters()))

    # functions ------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_whole or (self.skip_distributed and _from_distributed()):
            return out
        name = self._function_name(func)
        if name in ops.IGNORED or name.startswith("__get") or name == "__set__":
            return out
        if not tensor_leaves(out):
            return out
        if not self.building:
            # Every branch below names the node ``_fresh(name)``: the replay needs no more.
            self._replay(self._fresh(name), out)
            return out
        file, line = _caller_location(self.stop)
        if not tensor_leaves((args, kwargs)):
            # A tensor made from Python values alone (Gemma's ``torch.tensor(hidden **
            # 0.5)`` embedding scale, ``arange`` positions, an all-ones mask, a cache's
            # empty start): a constant with its value, as torch.export lifts constants;
            # what is computed from constants and weights alone (rotary cos/sin tables)
            # then folds into constants too (``_weight_only``), not ops to model.
            self._record(self._fresh(name), out, kind="get_attr", role="param",
                         target=name, file=file, line=line)
            return out
        ref_args = self._refs(tuple(args))
        ref_kwargs = self._refs(dict(kwargs))
        weights = self._weight_only((args, kwargs)) \
            if isinstance(out, torch.Tensor) and name != "embedding" else None
        if weights is not None:  # an embedding lookup stays a layer (OPT's learned positions)
            self._record_weight(name, out, weights, kind="call_function", target=func,
                                args=ref_args, kwargs=ref_kwargs, file=file, line=line)
            return out
        params = []
        num = 0
        for leaf in tensor_leaves((args, kwargs)):
            if id(leaf) in self.param_ids:
                params.append(self.param_ids[id(leaf)])
                num += leaf.numel()
                continue
            source = self.producer.get(id(leaf))
            record = node_record(self.graph, source) \
                if source is not None and source in self.graph else None
            if source is not None and record is not None and record.role == "param" \
                    and record.num_params:
                # A weight made from weights (``-exp(A_log)``, ``w.T``): the layer that
                # multiplies by it trains them, as the fx conversion attributes them.
                params.append(record.module or source)
                num += record.num_params
        self._record(self._fresh(name), out, kind="call_function", role="compute", target=func,
                     args=ref_args, kwargs=ref_kwargs, file=file, line=line, params=params,
                     num_params=num, module_path=self.stack[-1] if self.stack else None)
        return out


@functools.cache
def _stdlib() -> str:
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def _from_distributed() -> bool:
    """Whether the op being recorded was called by torch.distributed's code (FSDP's hooks),
    looking out from the caller until the first frame of the user's code."""
    from gradscope.tracing.graph import is_library_file

    stdlib = _stdlib()
    frame: FrameType | None = sys._getframe(2)
    for _ in range(16):
        if frame is None:
            return False
        path = frame.f_code.co_filename
        if "torch/distributed/" in path.replace("\\", "/"):
            return True
        if not is_library_file(path) and not path.startswith(stdlib):
            return False
        frame = frame.f_back
    return False


@contextmanager
def _recording(model: nn.Module, recorder: _Recorder) -> Iterator[None]:
    """Hooks on the modules kept whole and the function mode, removed whatever happens."""
    handles = []
    try:
        for module in model.modules():
            if _is_whole(module):
                handles.append(module.register_forward_pre_hook(recorder.pre_hook))
                handles.append(module.register_forward_hook(recorder.post_hook))
            else:
                handles.append(module.register_forward_pre_hook(recorder.enter))
                handles.append(module.register_forward_hook(recorder.leave))
        with recorder:
            yield
    finally:
        for handle in handles:
            handle.remove()
        # The recorder holds its caller's frame (``stop``), which holds the model's output
        # and its autograd graph: a cycle that kept them alive until the next collection,
        # a whole forward's activations beside the probe's own (issue 15).
        recorder.stop = None


class RuntimeRunner(Runner):
    """Replays the recorder during the probe so each node's output is observed."""

    def __init__(self, model: nn.Module, graph: nx.DiGraph, output_key: str | None,
                 skip_distributed: bool = False) -> None:
        self.model = model
        self.graph = graph
        self.output_key = output_key
        self.skip_distributed = skip_distributed

    def run(self, inputs: tuple[Any, ...], observe: Observer) -> torch.Tensor:
        recorder = _Recorder(self.model, self.graph, observe, self.skip_distributed)
        with _recording(self.model, recorder):
            recorder.add_inputs(inputs)
            out = self.model(*inputs)
        selected, _ = select_output(out, self.output_key, is_float_tensor)
        return selected  # type: ignore[no-any-return]


def is_float_tensor(value: Any) -> bool:
    """A floating-point tensor: what an output entry must be to be differentiated."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def trace_runtime(model: nn.Module, inputs: tuple[Any, ...], output_key: str | None,
                  attempts: list[TraceAttempt]) -> TracedModel:
    """Record the graph of one real forward (no gradients)."""
    recorder = _Recorder(model, None, None)
    with torch.no_grad(), _recording(model, recorder):
        recorder.add_inputs(inputs)
        try:
            out = model(*inputs)
        except Exception as exc:
            raise ModelForwardError(exc, recorder.running()) from exc
    selected, desc = select_output(out, output_key, is_float_tensor)
    output_node = recorder.producer.get(id(selected))
    if output_node is None:
        raise RuntimeError("the selected output tensor was not produced by a recorded op")
    # The recorded values were kept only so that ids stayed unique while recording: let
    # them go now, not whenever the recorder's reference cycles are collected, or the
    # probe's own activations must take fresh pages beside a whole forward's (issue 15).
    recorder.keep.clear()
    recorder.producer.clear()
    compute_depths(recorder.graph)
    attempts.append(TraceAttempt("runtime", True, None))
    return TracedModel(
        graph=recorder.graph, method="runtime", attempts=attempts, output_node=output_node,
        output_desc=desc, runner=RuntimeRunner(model, recorder.graph, output_key),
        tensors=recorder.tensors, modules=recorder.modules,
        notes=["the graph was recorded from one real forward: branches the example inputs "
               "did not take are not in it"],
    )
