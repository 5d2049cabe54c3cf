"""gradscope.tracing.trace_model: which tracer runs, and what every graph must hold.

The three tracers (``symbolic_trace`` -> ``export`` -> ``runtime``) must give
graphs the later stages can read the same way: one node per operation, a DAG,
real module paths, shapes and dtypes that match a real forward, and the
probed output chosen by one rule (``logits``, else the first floating tensor,
``output=`` overriding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import OutputError
from gradscope.tracing import TracedModel, trace_model
from gradscope.tracing.nodes import node_record

TRACERS = ("symbolic_trace", "export", "runtime")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.b(h) if h.sum() > 0 else self.c(h)
        return h


def _linear_nodes(traced: TracedModel) -> list[str]:
    g = traced.graph
    return [n for n in traced.order() if node_record(g, n).op in ("Linear", "linear")]


def _check_graph(traced: TracedModel) -> None:
    """Invariants every tracer's graph must satisfy."""
    g = traced.graph
    assert nx.is_directed_acyclic_graph(g)
    order = traced.order()
    position = {n: i for i, n in enumerate(order)}
    for src, dst in g.edges:
        assert position[src] < position[dst], (src, dst)
    assert traced.output_node in g
    for n, d in g.nodes(data="rec"):
        for ref in d.inputs:
            assert g.has_edge(ref, n)


# ---------------------------------------------------------------------------
# Which tracer


def test_plain_mlp_uses_symbolic_trace() -> None:
    traced = trace_model(MLP(), (_randn(4, 8),))
    assert traced.method == "symbolic_trace"
    assert [(a.method, a.ok) for a in traced.attempts] == [("symbolic_trace", True)]
    _check_graph(traced)


def test_transformer_encoder_is_recorded_when_it_may_run() -> None:
    """With the probe on (the model runs anyway) the recorder goes before torch.export: one
    forward without gradients instead of export's trace (issue 15)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    traced = trace_model(model, (_randn(2, 8, 32),))
    assert [(a.method, a.ok) for a in traced.attempts] == [
        ("symbolic_trace", False), ("runtime", True)]
    _check_graph(traced)
    paths = {d.module for _, d in traced.graph.nodes(data="rec")
             if d.role == "compute" and d.module}
    assert {"layers.0.linear1", "layers.0.linear2", "layers.1.linear1",
            "layers.0.self_attn", "layers.1.norm2"} <= paths


def test_meta_model_is_recorded_not_exported() -> None:
    """On the meta device a forward computes nothing: the recorder goes first there too."""
    with torch.device("meta"):
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64,
                                           batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    traced = trace_model(model, (torch.randn(2, 8, 32, device="meta"),), allow_run=False)
    assert traced.method == "runtime"


def test_transformer_encoder_falls_back_to_export() -> None:
    """--no-probe on real weights: export before the recorder (the model is not to run)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    traced = trace_model(model, (_randn(2, 8, 32),), allow_run=False)
    assert traced.method == "export"
    first = traced.attempts[0]
    assert (first.method, first.ok) == ("symbolic_trace", False)
    assert first.message  # why symbolic_trace failed, for the report
    assert [(a.method, a.ok) for a in traced.attempts[1:]] == [("export", True)]
    _check_graph(traced)

    real = {name for name, _ in model.named_modules()}
    paths = {d.module for _, d in traced.graph.nodes(data="rec")
             if d.role == "compute" and d.module}
    assert paths <= real, paths - real
    assert {"layers.0.linear1", "layers.0.linear2", "layers.1.linear1",
            "layers.0.self_attn", "layers.1.norm2"} <= paths
    # Every linear1/linear2 of the two layers is one linear node, with its module path.
    linear_paths = sorted(node_record(traced.graph, n).module for n in _linear_nodes(traced)
                          if "linear" in (node_record(traced.graph, n).module or ""))
    assert linear_paths == ["layers.0.linear1", "layers.0.linear2",
                            "layers.1.linear1", "layers.1.linear2"]
    # Lifted weights are named by their real parameter names.
    param_names = {d.module for _, d in traced.graph.nodes(data="rec") if d.role == "param"}
    assert "layers.0.linear1.weight" in param_names
    assert param_names <= {n for n, _ in model.named_parameters()} | \
        {n for n, _ in model.named_buffers()} | {None}


def test_data_dependent_control_flow_falls_back_to_runtime() -> None:
    model = DataDependent()
    x = _randn(4, 8)
    assert [(a.method, a.ok) for a in trace_model(model, (x,)).attempts] == [
        ("symbolic_trace", False), ("runtime", True)]
    traced = trace_model(model, (x,), allow_run=False)  # export is tried before it there
    assert traced.method == "runtime"
    assert [(a.method, a.ok) for a in traced.attempts] == [
        ("symbolic_trace", False), ("export", False), ("runtime", True)]
    for attempt in traced.attempts[:2]:
        # One line, the exception type first, trimmed (the text to 300 characters).
        assert attempt.message and "\n" not in attempt.message
        assert len(attempt.message) <= 300 + len(attempt.message.split(":")[0]) + 2
    assert any("branches" in note for note in traced.notes)
    _check_graph(traced)
    # Only the branch that ran is in the graph.
    with torch.no_grad():
        took_b = bool(model.a(x).sum() > 0)
    modules = {d.module for _, d in traced.graph.nodes(data="rec")}
    assert ("b" in modules) == took_b and ("c" in modules) != took_b


def test_unknown_tracer_is_an_error() -> None:
    with pytest.raises(gradscope.GradscopeError, match="unknown tracer"):
        trace_model(MLP(), (_randn(4, 8),), method="jit")


def test_model_that_cannot_run_is_a_clear_error() -> None:
    from gradscope.errors import InputError

    with pytest.raises(InputError, match="could not be run"):
        trace_model(MLP(), (_randn(4, 5),))  # wrong feature size for every tracer


# ---------------------------------------------------------------------------
# Same model, each tracer forced


@pytest.mark.parametrize("method", TRACERS)
def test_forced_tracers_agree_on_structure(method: str) -> None:
    model = MLP()
    x = _randn(4, 8)
    traced = trace_model(model, (x,), method=method)
    assert traced.method == method
    assert [(a.method, a.ok) for a in traced.attempts] == [(method, True)]
    _check_graph(traced)
    g = traced.graph
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    linears = _linear_nodes(traced)
    assert len(linears) == n_linear == 3
    assert [node_record(g, n).module for n in linears] == ["fc1", "fc2", "head"]
    # Each linear node carries its own weights.
    for n in linears:
        mod = node_record(g, n).module
        assert node_record(g, n).num_params == sum(
            p.numel() for p in model.get_submodule(mod).parameters())
    # Depth counts operations along the longest path: input 0, fc1 1, relu 2, fc2 3, ...
    assert [node_record(g, n).depth for n in linears] == [1, 3, 5]
    assert node_record(g, traced.output_node).module == "head"
    inputs = [n for n in traced.order() if node_record(g, n).role == "input"]
    assert len(inputs) == 1 and list(node_record(g, inputs[0]).shape or ()) == [4, 8]


@pytest.mark.parametrize("method", TRACERS)
def test_shapes_and_dtypes_match_a_real_forward(method: str) -> None:
    model = MLP()
    x = _randn(5, 8)
    seen: dict[str, tuple[list[int], str]] = {}
    handles = [m.register_forward_hook(
        lambda mod, args, out, name=name: seen.__setitem__(
            name, (list(out.shape), str(out.dtype).replace("torch.", ""))))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    traced = trace_model(model, (x,), method=method)
    g = traced.graph
    got = {node_record(g, n).module: (list(node_record(g, n).shape or ()), node_record(g, n).dtype)
           for n in _linear_nodes(traced)}
    assert got == seen
    for n in _linear_nodes(traced):
        assert node_record(g, n).is_float and node_record(g, n).is_tensor


def test_source_locations_point_at_the_users_lines() -> None:
    import inspect

    lines, start = inspect.getsourcelines(MLP.forward)
    call_line = start + next(i for i, text in enumerate(lines) if "self.head(" in text)
    for method in TRACERS:
        traced = trace_model(MLP(), (_randn(4, 8),), method=method)
        for n in _linear_nodes(traced):
            d = traced.node(n)
            assert d.file == __file__, (method, n, d.file)
            assert d.line == call_line, (method, n)


# ---------------------------------------------------------------------------
# Inputs


class EmbedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Linear(6, 8)
        self.right = nn.Linear(3, 8)
        self.head = nn.Linear(16, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.left(a), self.right(b)], dim=-1))


@pytest.mark.parametrize("method", TRACERS)
def test_integer_inputs(method: str) -> None:
    model = EmbedModel()
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    traced = trace_model(model, (ids,), method=method)
    g = traced.graph
    inputs = [n for n in traced.order() if node_record(g, n).role == "input"]
    assert len(inputs) == 1
    assert node_record(g, inputs[0]).dtype == "int64" and not node_record(g, inputs[0]).is_float
    assert list(node_record(g, traced.output_node).shape or ()) == [3, 5, 4]
    report = gradscope.analyze(model, ids, device="cpu", tracer=method)
    by_op = {layer.op.lower(): layer for layer in report.layers}
    assert by_op["input"].probe_grad_rms is None  # integer ids have no gradient
    assert by_op["embedding"].probe_grad_rms is not None
    ratio = by_op["embedding"].param_grad_ratio
    assert ratio is not None and ratio > 0


@pytest.mark.parametrize("method", TRACERS)
def test_two_positional_inputs(method: str) -> None:
    model = TwoInputs()
    a, b = _randn(4, 6, seed=1), _randn(4, 3, seed=2)
    traced = trace_model(model, (a, b), method=method)
    g = traced.graph
    inputs = [n for n in traced.order() if node_record(g, n).role == "input"]
    assert [list(node_record(g, n).shape or ()) for n in inputs] == [[4, 6], [4, 3]]
    linears = {node_record(g, n).module: n for n in _linear_nodes(traced)}
    assert nx.has_path(g, inputs[0], linears["left"])
    assert not nx.has_path(g, inputs[0], linears["right"])
    assert nx.has_path(g, inputs[1], linears["right"])
    report = gradscope.analyze(model, (a, b), device="cpu", tracer=method)
    grads = [layer.probe_grad_rms for layer in report.layers if layer.op == "input"]
    assert len(grads) == 2 and all(v is not None and v > 0 for v in grads)


# ---------------------------------------------------------------------------
# Which output is probed


@dataclasses.dataclass
class PlainOutput:
    hidden: torch.Tensor
    logits: torch.Tensor


@dataclasses.dataclass
class ModelOutputLike:
    """Shaped like a Hugging Face ModelOutput: optional loss first, None fields allowed."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MultiOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> Any:
        features = torch.relu(self.body(x))
        logits = self.head(features)
        if self.kind == "dict":
            return {"features": features, "logits": logits}
        if self.kind == "tuple":
            return logits.argmax(-1), features, logits  # an integer tensor first
        if self.kind == "dataclass":
            return PlainOutput(hidden=features, logits=logits)
        return ModelOutputLike(logits=logits, hidden_states=(features,))


# kind -> (default path, shape of the default selection)
OUTPUTS = {
    "dict": ("output['logits']", [4, 3]),
    "tuple": ("output[1]", [4, 16]),
    "dataclass": ("output.logits", [4, 3]),
    "model_output": ("output.logits", [4, 3]),
}


@pytest.mark.parametrize("method", TRACERS)
@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_output_selection(kind: str, method: str) -> None:
    desc, shape = OUTPUTS[kind]
    traced = trace_model(MultiOutput(kind), (_randn(4, 8),), method=method)
    assert traced.output_desc == desc
    node = traced.node(traced.output_node)
    assert list(node.shape or ()) == shape
    if shape == [4, 3]:
        assert node.module == "head"


@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_output_selection_with_default_tracer(kind: str) -> None:
    """The automatic choice must not give up on a container output."""
    desc, _ = OUTPUTS[kind]
    report = gradscope.analyze(MultiOutput(kind), _randn(4, 8), device="cpu")
    assert report.model.output == desc
    assert report.probe.output_grad_rms is not None


@pytest.mark.parametrize("method", TRACERS)
def test_output_key_override(method: str) -> None:
    traced = trace_model(MultiOutput("dict"), (_randn(4, 8),), output_key="features",
                         method=method)
    assert traced.output_desc == "output['features']"
    assert list(node_record(traced.graph, traced.output_node).shape or ()) == [4, 16]
    traced = trace_model(MultiOutput("tuple"), (_randn(4, 8),), output_key="2", method=method)
    assert traced.output_desc == "output[2]"
    assert list(node_record(traced.graph, traced.output_node).shape or ()) == [4, 3]
    with pytest.raises(OutputError, match="no entry"):
        trace_model(MultiOutput("dict"), (_randn(4, 8),), output_key="nope", method=method)


def test_override_changes_what_the_probe_differentiates() -> None:
    model, x = MultiOutput("dict"), _randn(4, 8)
    logits = gradscope.analyze(model, x, device="cpu")
    features = gradscope.analyze(model, x, device="cpu", output="features")
    assert features.model.output == "output['features']"
    head = [layer for layer in features.layers if layer.module == "head"]
    # The head does not feed the features: it gets no gradient when they are probed.
    assert all(layer.probe_grad_rms in (None, 0.0) for layer in head)
    assert next(layer for layer in logits.layers if layer.module == "head").probe_grad_rms == 1.0


def test_huggingface_model_output() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import CausalLMOutput

    class HFStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(8, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> Any:
            h = torch.relu(self.body(x))
            return CausalLMOutput(logits=self.head(h), hidden_states=(h,))

    assert transformers is not None
    for method in TRACERS:
        try:
            traced = trace_model(HFStyle(), (_randn(4, 8),), method=method)
        except Exception:
            if method == "symbolic_trace":
                continue  # fx may not follow ModelOutput construction; export must
            raise
        assert traced.output_desc in ("output['logits']", "output.logits"), method
        assert node_record(traced.graph, traced.output_node).module == "head"


def test_quiet_torch_logs_silences_torch_loggers_old_and_new_and_restores_them() -> None:
    """Export's failure logs stay out of the output; every logger is left as it was."""
    import logging

    from gradscope.tracing import quiet_torch_logs

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger("torch").addHandler(handler)  # torch's loggers may not propagate
    existing = logging.getLogger("torch.gradscope_test")
    existing.setLevel(logging.INFO)  # a level of its own: the parent's does not reach it
    try:
        with quiet_torch_logs():
            existing.warning("guard failed")
            logging.getLogger("torch.gradscope_created_inside").warning("graph dump")
            logging.getLogger("torch").error("export failed")
        assert records == []
        assert existing.level == logging.INFO and not existing.disabled
        existing.warning("after")
        assert [r.getMessage() for r in records] == ["after"]
    finally:
        logging.getLogger("torch").removeHandler(handler)


def test_tracing_with_a_real_forward_leaves_buffers_and_rng_as_found() -> None:
    """With allow_run the fx values come from one real forward (no fake tensors): the
    BatchNorm statistics and the RNG states that the probe's dropout draws from are
    left as they were, and the shapes recorded are the fake path's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                          nn.ReLU(), nn.Linear(16, 2)).train()
    x = torch.randn(4, 8)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    real = trace_model(model, (x,), allow_run=True)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    fake = trace_model(model, (x,), allow_run=False)
    assert real.method == fake.method == "symbolic_trace"
    assert [(r.name, r.shape, r.dtype) for r in real.records()] \
        == [(r.name, r.shape, r.dtype) for r in fake.records()]
