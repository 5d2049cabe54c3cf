"""The two symbolic tracers: ``torch.fx.symbolic_trace`` first, ``torch.export`` second.

Both yield fx graphs, so both share the conversion to the common networkx
form and the Interpreter-based runner the probe uses. Shapes come from fake
tensors (nothing real is computed), falling back to one real forward under
``no_grad`` only when fake execution cannot follow an op.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from gradscope.errors import OutputError
from gradscope.outputs import select_output
from gradscope.records import TraceAttempt
from gradscope.tracing import ops
from gradscope.tracing.graph import Observer, Runner, TracedModel, graph_from_fx, user_location


class NodeExecutionError(RuntimeError):
    """An op failed while a pass ran the graph; carries the fx node, like ShapeProp's errors."""

    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(
            f"{type(error).__name__} at node {node.name} ({node.format_node()}): {error}")
        self.node = node
        self.error = error


class _Unkeyable(Exception):
    """A value that cannot be part of a memo key (its result might depend on more)."""


#: nn.Module bookkeeping attributes: hooks and state dicts, not configuration.
_MODULE_BOOKKEEPING = frozenset(nn.Module().__dict__) - {"training"}
_KEY_SCALARS = (bool, int, float, complex, str, type(None), torch.dtype, torch.device,
                torch.layout, torch.memory_format)
#: call_function targets from these modules compute from their arguments alone.
_PURE_MODULES = ("_operator", "operator", "builtins", "math")
_MUTATING_OPERATORS = frozenset({"setitem", "delitem"})


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a node argument: tensors by metadata, never by value.

    Under fake tensors only metadata exists, so two calls whose arguments freeze
    equal return equal metadata. Fake constants (which do carry values) and
    anything else not listed here make the node unkeyable.
    """
    if isinstance(value, torch.Tensor):
        if getattr(value, "constant", None) is not None:
            raise _Unkeyable
        try:
            return (type(value), tuple(value.shape), tuple(value.stride()), value.dtype,
                    value.device, value.layout, value.requires_grad, value.storage_offset())
        except Exception as exc:
            raise _Unkeyable from exc
    if isinstance(value, _KEY_SCALARS):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((_freeze(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return (slice, _freeze(value.start), _freeze(value.stop), _freeze(value.step))
    if value is Ellipsis:
        return (type(value),)
    raise _Unkeyable


def _module_key(module: nn.Module) -> Any:
    """Class, configuration, parameter/buffer metadata and children of a leaf module."""
    if module._forward_hooks or module._forward_pre_hooks:
        raise _Unkeyable
    config = tuple((k, _freeze(v)) for k, v in module.__dict__.items()
                   if k not in _MODULE_BOOKKEEPING)
    return (type(module), config,
            tuple((k, _freeze(p)) for k, p in module._parameters.items()),
            tuple((k, _freeze(b)) for k, b in module._buffers.items()),
            tuple((k, None if c is None else _module_key(c)) for k, c in module._modules.items()))


def _target_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _mutates_metadata(n: fx.Node) -> bool:
    """In-place ops (``x.unsqueeze_``, ``requires_grad_``, ``out=``) can change a value's shape."""
    name = _target_name(n)
    return n.op in ("call_function", "call_method") and (
        (name.endswith("_") and not name.endswith("__")) or "out" in n.kwargs)


class ValuePropagation(fx.Interpreter):
    """Runs the graph once and keeps each node's value in ``values`` (for the shapes).

    The values are the caller's to drop: nothing else holds them (not the graph
    module's ``node.meta``), so a trace does not keep a whole forward's activations
    alive while the probe runs (issue 15: on a 6-layer GPT-2 that was 173 MB, which
    the probe's own activations then had to take in fresh pages).

    Under a FakeTensorMode the values are fake tensors (shapes and dtypes only);
    errors are re-raised with the node attached.

    ``memo=True`` (fake tensors only): a node whose op and arguments match an
    earlier node's by metadata (the same layer config on the same input shape,
    as in every block of a deep stack) reuses that node's output instead of
    dispatching again; fake dispatch costs about a millisecond per op, which made
    this pass most of the static analysis time. Outputs are then shared objects,
    so the memo is off for graphs with in-place metadata changes and values must
    not be told apart by identity (see ``_select_fx_output``).
    """

    def __init__(self, gm: fx.GraphModule, memo: bool = False) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, Any] = {}
        from torch.nn.modules import module as module_impl

        self.memo: dict[Any, Any] | None = {} if memo and not any(
            _mutates_metadata(n) for n in gm.graph.nodes) else None
        self.memo_modules = not (module_impl._global_forward_hooks or
                                 module_impl._global_forward_pre_hooks)
        self._module_keys: dict[str, Any] = {}
        self.memo_hits = 0

    def _key(self, n: fx.Node) -> Any:
        if n.op == "call_module":
            if not self.memo_modules:
                return None
            target: Any = self._module_keys.get(str(n.target))
            if target is None:
                target = self._module_keys[str(n.target)] = \
                    _module_key(self.fetch_attr(str(n.target)))
        elif n.op == "call_method":
            target = n.target
        elif n.op == "call_function":
            module = getattr(n.target, "__module__", None) or ""
            if not (module.startswith("torch") or module in _PURE_MODULES) \
                    or _target_name(n) in _MUTATING_OPERATORS:
                return None
            target = n.target
        else:
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return (n.op, target, _freeze(args), _freeze(kwargs))

    def run_node(self, n: fx.Node) -> Any:
        key = None
        if self.memo is not None:
            try:
                key = self._key(n)
                hash(key)
            except (_Unkeyable, TypeError):
                key = None
        if key is not None and key in self.memo:  # type: ignore[operator]
            out = self.memo[key]  # type: ignore[index]
            self.memo_hits += 1
        else:
            try:
                out = super().run_node(n)
            except Exception as exc:
                raise NodeExecutionError(n, exc) from exc
            if key is not None:
                self.memo[key] = out  # type: ignore[index]
        self.values[n.name] = out
        return out


class FxRunner(Runner):
    """Runs an fx graph with real tensors, reporting each analysed node's output."""

    def __init__(self, gm: fx.GraphModule, nodes: set[str], output_node: str,
                 template: list[tuple[str, Any]] | None = None) -> None:
        self.gm = gm
        self.nodes = nodes
        self.output_node = output_node
        #: Placeholder order: ("tensor", t) for lifted weights, ("input", i) for user inputs.
        self.template = template

    def arguments(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """Placeholder values: user inputs, and lifted weights read from the model *now*.

        Weights are looked up at run time because the probe may have moved the
        model to another device since tracing (buffers are replaced on ``.to``).
        """
        if self.template is None:
            return tuple(inputs)
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
        args: list[Any] = []
        for kind, value in self.template:
            if kind == "input":
                args.append(inputs[value])
            elif kind == "attr":
                root, target, is_param = value
                args.append(root.get_parameter(target) if is_param else root.get_buffer(target))
            else:
                args.append(value.to(device) if device is not None else value)
        return tuple(args)

    def run(self, inputs: tuple[Any, ...], observe: Observer) -> torch.Tensor:
        if self.template is None:
            device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
            if device is not None:
                self.gm.to(device)  # the GraphModule's own copies of get_attr tensors
        interpreter = _Observing(self, observe)
        interpreter.run(*self.arguments(inputs))
        return interpreter.result.pop("out")  # type: ignore[no-any-return]


class _Observing(fx.Interpreter):
    """FxRunner's interpreter: reports analysed nodes, keeps the probed output.

    A module-level class: one defined per run is cyclic garbage, and its closure
    kept the run's output tensor (a batch of logits) alive until the next
    garbage collection, so memory grew with every probe batch.
    """

    def __init__(self, runner: FxRunner, observe: Observer) -> None:
        super().__init__(runner.gm, garbage_collect_values=True)
        self.runner = runner
        self.observe = observe
        self.result: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise NodeExecutionError(n, exc) from exc
        if n.name in self.runner.nodes:
            self.observe(n.name, out)
        if n.name == self.runner.output_node:
            self.result["out"] = out
        return out


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, recording stack traces and keeping only modeled modules whole.

    torch.nn modules without children (Linear, ReLU, LSTM, ...) and
    MultiheadAttention stay single nodes; everything else, torch.nn containers
    such as TransformerEncoderLayer included, is traced into so the estimator
    sees its parts.
    """

    def __init__(self) -> None:
        super().__init__()
        # Not torch's record_stack_traces: it symbolises every frame of every node and,
        # the first time in a process, imports torch's compiler stack (1.7 s of a 2.3 s
        # first analysis of a small MLP). The user's frame alone is what the report shows.
        self.record_stack_traces = False
        self._entry: FrameType | None = None

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._entry = sys._getframe()
        try:
            return super().trace(root, concrete_args)
        finally:
            self._entry = None

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        path, line = user_location(stop=self._entry)
        if path is not None:
            node.meta["stack_trace"] = f'  File "{path}", line {line}, in forward\n'
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        cls = type(m)
        if cls.__name__ in ops.LEAF_WITH_CHILDREN:
            return True
        in_torch = cls.__module__.startswith(("torch.nn", "torch.ao.nn"))
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return in_torch and next(m.children(), None) is None


def _propagate_values(gm: fx.GraphModule, inputs: tuple[Any, ...], memo: bool = True,
                      real: bool = False) -> tuple[dict[str, Any], str | None]:
    """Node values from fake tensors, or from one real no-grad forward when fake fails.

    Returns the values and a note when the real forward was needed. ``memo``:
    see :class:`ValuePropagation` (values may be shared between nodes). ``real``: the
    model may be run (the probe will run it anyway), so one real forward without
    gradients gives the values directly: fake tensors cost a millisecond per op and, the
    first time in a process, importing torch's compiler stack (1.4 s; issue 15). The
    forward leaves no trace: the global RNG states are forked and the buffers (BatchNorm's
    running statistics) put back.
    """
    if real and not any(t.is_meta for t in inputs if isinstance(t, torch.Tensor)):
        return _real_values(gm, inputs), None
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_inputs = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                for t in inputs)
            prop = ValuePropagation(gm, memo=memo)
            prop.run(*fake_inputs)
        return prop.values, None
    except NodeExecutionError as exc:
        fake_error = exc
    from gradscope.tracing.runtime import ModelForwardError

    prop = ValuePropagation(gm)
    with torch.no_grad():
        try:
            prop.run(*inputs)
        except NodeExecutionError as exc:  # a real failure here is the model's own error
            raise ModelForwardError.at_node(exc.node, exc.error) from exc
    return prop.values, (
        f"shapes were taken from one real forward without gradients: fake tensors could not "
        f"run node {fake_error.node.name} ({type(fake_error.error).__name__})"
    )


def _real_values(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """One real forward without gradients, leaving RNG states and buffers as they were."""
    from gradscope.tracing.runtime import ModelForwardError

    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    devices = sorted({t.device.index or 0 for t in [*inputs, *gm.parameters()]
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    prop = ValuePropagation(gm, memo=False)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            prop.run(*inputs)
    except NodeExecutionError as exc:  # a real failure here is the model's own error
        raise ModelForwardError.at_node(exc.node, exc.error) from exc
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
    return prop.values


def _is_float_node(values: dict[str, Any]) -> Any:
    def check(item: Any) -> bool:
        if isinstance(item, fx.Node):
            value = values.get(item.name)
            return isinstance(value, torch.Tensor) and value.is_floating_point()
        return False

    return check


def _select_fx_output(arg: Any, output_key: str | None, values: dict[str, Any],
                      gm: fx.GraphModule, inputs: tuple[Any, ...] | None = None,
                      ) -> tuple[fx.Node, str]:
    """The fx node holding the probed output, and its path.

    Selection runs on the output's node structure first; when a node's value is
    itself a container (fx records ``MyOutput(logits=...)`` dataclass construction
    as one call), it runs on the propagated values and maps the chosen tensor back
    to the node that produced it. That mapping goes by object identity, so the
    values are propagated again from ``inputs`` without the memo (which shares
    output objects between nodes).
    """
    try:
        return select_output(arg, output_key, _is_float_node(values))  # type: ignore[no-any-return]
    except OutputError as exc:
        first_error = exc
    if inputs is not None:
        values = _propagate_values(gm, inputs, memo=False)[0]
    structure = fx.node.map_arg(arg, lambda n: values.get(n.name))
    try:
        value, desc = select_output(
            structure, output_key,
            lambda v: isinstance(v, torch.Tensor) and v.is_floating_point())
    except OutputError:
        raise first_error from None
    producers = {id(v): n for n in gm.graph.nodes
                 if isinstance(v := values.get(n.name), torch.Tensor)}
    node = producers.get(id(value))
    if node is None:
        raise first_error
    return node, desc


def trace_symbolic(model: nn.Module, inputs: tuple[Any, ...], output_key: str | None,
                   attempts: list[TraceAttempt], run: bool = False) -> TracedModel:
    """``torch.fx.symbolic_trace`` with source lines, then the values of every node.

    ``run``: the model may be run (the probe will), so the values come from one real
    forward without gradients instead of fake tensors (:func:`_propagate_values`).
    """
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise TypeError(
            f"forward takes {len(placeholders)} tensor arguments, {len(inputs)} inputs given"
        )
    values, note = _propagate_values(gm, inputs, real=run)
    tensors: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attr: Any = gm
            for part in str(node.target).split("."):
                attr = getattr(attr, part)
            if isinstance(attr, torch.Tensor):
                tensors[node.name] = attr
    nxg, _ = graph_from_fx(gm, values=values, roles={}, tensors=tensors, root=model)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    selected, desc = _select_fx_output(output.args[0], output_key, values, gm, inputs)
    attempts.append(TraceAttempt("symbolic_trace", True, None))
    compute = {n for n, d in nxg.nodes(data="rec") if d.role in ("input", "compute")}
    traced = TracedModel(
        graph=nxg, method="symbolic_trace", attempts=attempts, output_node=selected.name,
        output_desc=desc, runner=FxRunner(gm, compute, selected.name), tensors=tensors,
        modules={str(n.target): gm.get_submodule(str(n.target))
                 for n in gm.graph.nodes if n.op == "call_module"},
    )
    if note:
        traced.notes.append(note)
    return traced


class _SelectingWrapper(nn.Module):
    """Returns only the probed tensor, so export never sees caches or custom output types."""

    def __init__(self, model: nn.Module, output_key: str | None) -> None:
        super().__init__()
        self.gradscope_model = model
        self.output_key = output_key
        # torch.export reverts attribute writes made during tracing (module __dict__
        # contents included), so the chosen path is recorded through a closure.
        descs: list[str] = []
        self._record_desc = lambda desc: descs.append(desc)
        self._descs = lambda: list(descs)

    @property
    def output_desc(self) -> str:
        descs = self._descs()
        return descs[-1] if descs else "output"

    def forward(self, *inputs: Any) -> torch.Tensor:
        out = self.gradscope_model(*inputs)
        selected, desc = select_output(
            out, self.output_key,
            lambda v: isinstance(v, torch.Tensor) and v.is_floating_point(),
        )
        self._record_desc(desc)
        return selected  # type: ignore[no-any-return]


PREFIX = "gradscope_model."


def trace_export(model: nn.Module, inputs: tuple[Any, ...], output_key: str | None,
                 attempts: list[TraceAttempt]) -> TracedModel:
    """``torch.export.export`` (non-strict) of the model behind a selecting wrapper."""
    from torch.export.graph_signature import InputKind, OutputKind

    wrapper = _SelectingWrapper(model, output_key)
    ep = torch.export.export(wrapper, tuple(inputs), strict=False)
    gm = ep.graph_module
    roles: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    param_names: dict[str, str] = {}
    template: list[tuple[str, Any]] = []
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name  # type: ignore[union-attr]
        if spec.kind == InputKind.USER_INPUT:
            roles[name] = "input"
            template.append(("input", sum(1 for k, _ in template if k == "input")))
            continue
        target = spec.target or name
        roles[name] = "param"
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            is_param = spec.kind == InputKind.PARAMETER
            tensor = wrapper.get_parameter(target) if is_param else wrapper.get_buffer(target)
            template.append(("attr", (wrapper, target, is_param)))
        else:
            tensor = ep.constants[target]  # type: ignore[assignment]
            template.append(("const", tensor))
        tensors[name] = tensor
        param_names[name] = target[len(PREFIX):] if target.startswith(PREFIX) else target
    user_outputs = [s.arg.name for s in ep.graph_signature.output_specs  # type: ignore[union-attr]
                    if s.kind == OutputKind.USER_OUTPUT]
    values = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    nxg, _ = graph_from_fx(gm, values=values, roles=roles, tensors=tensors, root=model,
                           module_prefix=PREFIX, param_names=param_names)
    attempts.append(TraceAttempt("export", True, None))
    compute = {n for n, d in nxg.nodes(data="rec") if d.role in ("input", "compute")}
    output_node = user_outputs[0]
    return TracedModel(
        graph=nxg, method="export", attempts=attempts, output_node=output_node,
        output_desc=wrapper.output_desc,
        runner=FxRunner(gm, compute, output_node, template), tensors=tensors,
    )
