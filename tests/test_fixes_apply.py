"""``gradscope.fixes.apply``: each action makes the change the report verified.

For each op a small model is analysed, the recommendation carrying that op is taken
from the report and applied to a deep copy. The tests check (a) the model changed
exactly as the action says (classes, weight statistics against the stated std,
biases, flags, wrapped spans), (b) the forward still runs with the same output shape,
and (c) the figure the recommendation's ``verified`` names, re-estimated on the
*changed real model* (not on the graph what-if the fix was verified on), lands within
an order of magnitude of ``verified.after``: the action is the change that was verified.
"""

from __future__ import annotations

import ast
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import SAMPLES
from torch import nn

import gradscope
from gradscope.errors import FixError
from gradscope.fixes import LOOP_OPS, Residual, apply
from gradscope.records import Recommendation
from gradscope.report import Report

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WIDTH = 32


def _mlp(depth: int, act: type[nn.Module], std_gain_sq: float | None = None,
         bias: float | None = None, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, WIDTH), act()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                if std_gain_sq is not None:
                    nn.init.normal_(m.weight, 0.0, math.sqrt(std_gain_sq / WIDTH))
                if bias is not None and m.out_features == WIDTH:
                    m.bias.fill_(bias)
    return model


class FunctionalTanh(nn.Module):
    """tanh called in the forward: no module to swap."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(12))
        self.out = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)


class Recurrent(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(8, 16, batch_first=True)
            with torch.no_grad():  # a closed forget gate: the gradient dies through time
                self.rnn.bias_ih_l0[16:32].fill_(-3.0)
                self.rnn.bias_hh_l0.zero_()
        else:
            self.rnn = nn.RNN(8, 16, batch_first=True)
            with torch.no_grad():
                self.rnn.weight_hh_l0.mul_(0.3)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class PostLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _recs(report: Report) -> Iterator[Recommendation]:
    for finding in report.findings:
        yield from finding.recommendations


def _with_op(report: Report, op: str) -> Recommendation:
    for rec in _recs(report):
        action = rec.action or {}
        ops = [action.get("op")] + [s["op"] for s in action.get("actions", [])]
        if op in ops:
            return rec
    raise AssertionError(f"no recommendation with a {op!r} action: "
                         f"{[(r.kind, r.action) for r in _recs(report)]}")


# -- re-estimating the verified figure on the changed model -----------------------------

def _static(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    from gradscope.estimate.engine import estimate
    from gradscope.rules.analysis import Analysis
    from gradscope.tracing import trace_model

    traced = trace_model(model, inputs)
    return Analysis(traced=traced, estimate=estimate(traced, inputs), probe=None,
                    inputs=inputs, model=model)


def _entry_figure(model: nn.Module, inputs: tuple[Any, ...], worst: str = "low") -> float:
    from gradscope.rules.variants import extreme_health

    analysis = _static(model, inputs)
    value = extreme_health(analysis.estimate, analysis.facts.entries, worst)
    assert value is not None
    return value


def _recurrent_figure(model: nn.Module, inputs: tuple[Any, ...]) -> float:
    analysis = _static(model, inputs)
    node, result = next(iter(analysis.estimate.recurrent.items()))
    assert analysis.traced.node(node).module == "rnn"
    return float(math.sqrt(max(result.step_gain, 0.0)) ** (int(result.steps) - 1))


def _pre_ln_figure(model: nn.Module, inputs: tuple[Any, ...], module: str) -> float:
    from gradscope.rules.fixes import _weight_grad

    analysis = _static(model, inputs)
    graph = analysis.traced.graph
    node = next(n for n in analysis.traced.order() if analysis.traced.node(n).module == module
                and analysis.traced.node(n).trainable)
    value = _weight_grad(graph, analysis.estimate, node)
    assert value is not None
    return math.sqrt(value)


def _same_magnitude(measured: float, predicted: float) -> None:
    assert measured > 0 and predicted > 0
    assert abs(math.log10(measured) - math.log10(predicted)) < 1.0, (measured, predicted)


def _applied(model: nn.Module, rec: Recommendation, inputs: tuple[Any, ...]) -> nn.Module:
    """apply on a deep copy; the original is untouched and the output shape is kept."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(*inputs)
    fixed = apply(copy.deepcopy(model), rec, seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fixed(*inputs).shape == out.shape
    return fixed


def _check_init(model: nn.Module, modules: list[str], gain_sq: float) -> None:
    """Each weight's empirical std against sqrt(gain_sq / fan_in); biases zero."""
    for name in modules:
        layer = model.get_submodule(name)
        w = layer.weight.detach()
        expected = math.sqrt(gain_sq / math.prod(w.shape[1:]))
        # Std of an n-sample std estimate is about std / sqrt(2n): 5 of them is far out.
        assert abs(float(w.std()) / expected - 1) < 5 / math.sqrt(2 * w.numel()), name
        assert abs(float(w.mean())) < 5 * expected / math.sqrt(w.numel()), name
        assert torch.count_nonzero(layer.bias) == 0, name


# -- the ops --------------------------------------------------------------------------

def test_swap_activation_and_kaiming_init() -> None:
    model, inputs = _mlp(10, nn.Sigmoid), (_x(64, WIDTH),)
    rec = _with_op(gradscope.analyze(model, inputs), "swap_activation")
    assert rec.action is not None and rec.verified is not None
    swap, init = rec.action["actions"]
    assert swap["modules"] == [str(i) for i in range(1, 20, 2)] and swap["to"] == "ReLU"
    assert init["std_gain_sq"] == 2.0 and init["modules"] == [str(i) for i in range(0, 21, 2)]
    fixed = _applied(model, rec, inputs)
    assert [type(m).__name__ for m in fixed] == ["Linear", "ReLU"] * 10 + ["Linear"]
    _check_init(fixed, init["modules"], 2.0)
    _same_magnitude(_entry_figure(model, inputs), rec.verified.before)
    _same_magnitude(_entry_figure(fixed, inputs), rec.verified.after)


def test_functional_activation_gets_no_swap_action_but_reinit_applies() -> None:
    model, inputs = FunctionalTanh(), (_x(64, WIDTH),)
    report = gradscope.analyze(model, inputs)
    swaps = [r for r in _recs(report) if r.kind == "activation"]
    assert swaps and all(r.action is None for r in swaps)  # torch.tanh has no module
    with pytest.raises(FixError, match="no action"):
        apply(copy.deepcopy(model), swaps[0])
    skips = [r for r in _recs(report) if r.kind == "residual_connection"]
    assert skips and all(r.action is None for r in skips)  # an nn.ModuleList, no Sequential
    rec = _with_op(report, "init")
    assert rec.action is not None and rec.verified is not None
    assert rec.action["std_gain_sq"] == 1.0
    fixed = _applied(model, rec, inputs)
    _check_init(fixed, rec.action["modules"], 1.0)
    _same_magnitude(_entry_figure(fixed, inputs), rec.verified.after)


def test_zero_bias() -> None:
    model, inputs = _mlp(6, nn.ReLU, bias=-3.0), (_x(64, WIDTH),)
    rec = _with_op(gradscope.analyze(model, inputs), "zero_bias")
    assert rec.action is not None and rec.verified is not None
    fixed = _applied(model, rec, inputs)
    for name, m in fixed.named_children():
        if isinstance(m, nn.Linear):
            original = model.get_submodule(name)
            assert torch.equal(m.weight, original.weight)
            zeroed = name in rec.action["modules"]
            assert (torch.count_nonzero(m.bias) == 0) == zeroed, name
    assert rec.verified.before == 0.0  # no gradient at all before
    _same_magnitude(_entry_figure(fixed, inputs), rec.verified.after)


def test_lstm_forget_gate_bias() -> None:
    model, inputs = Recurrent("lstm"), (_x(8, 60, 8),)
    rec = _with_op(gradscope.analyze(model, inputs), "lstm_forget_bias")
    assert rec.action == {"op": "lstm_forget_bias", "modules": ["rnn"], "value": 1.0}
    assert rec.verified is not None
    fixed = _applied(model, rec, inputs)
    lstm = fixed.rnn
    assert torch.all(lstm.bias_ih_l0[16:32] == 1.0) and torch.all(lstm.bias_hh_l0[16:32] == 0)
    assert torch.equal(lstm.bias_ih_l0[:16], model.rnn.bias_ih_l0[:16])
    _same_magnitude(_recurrent_figure(fixed, inputs), rec.verified.after)


def test_orthogonal_recurrent_weights() -> None:
    model, inputs = Recurrent("rnn"), (_x(8, 60, 8),)
    rec = _with_op(gradscope.analyze(model, inputs), "orthogonal_recurrent")
    assert rec.action is not None and rec.verified is not None
    fixed = _applied(model, rec, inputs)
    w = fixed.rnn.weight_hh_l0.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert torch.equal(fixed.rnn.weight_ih_l0, model.rnn.weight_ih_l0)
    _same_magnitude(_recurrent_figure(fixed, inputs), rec.verified.after)


def test_norm_first_for_post_ln_encoder() -> None:
    model, inputs = PostLN(), (_x(8, 10, WIDTH),)
    report = gradscope.analyze(model, inputs, steps=300)
    rec = _with_op(report, "norm_first")
    assert rec.action == {"op": "norm_first",
                          "modules": [f"enc.layers.{i}" for i in range(6)],
                          "final_norm": {"enc": WIDTH}}
    assert rec.verified is not None
    fixed = _applied(model, rec, inputs)
    assert all(layer.norm_first for layer in fixed.enc.layers)
    assert isinstance(fixed.enc.norm, nn.LayerNorm)
    module = rec.verified.metric.split("(")[1].split(")")[0]  # the layer it was verified on
    _same_magnitude(_pre_ln_figure(model, inputs, module), rec.verified.before)
    _same_magnitude(_pre_ln_figure(fixed, inputs, module), rec.verified.after)
    assert _pre_ln_figure(fixed, inputs, module) < _pre_ln_figure(model, inputs, module)
    warmup = _with_op(report, "warmup")
    assert warmup.action == {"op": "warmup", "steps": 30, "start_factor": 0.1}
    with pytest.raises(FixError, match="training loop"):
        apply(copy.deepcopy(model), warmup)


class HandWrittenPostLN(nn.Module):
    """Post-LN blocks written out by hand: the forward has to change, no flag does it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(),
                                                nn.Linear(64, WIDTH)) for _ in range(6))
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp, norm in zip(self.mlps, self.norms, strict=True):
            x = norm(x + mlp(x))
        return x


def test_hand_written_post_ln_gets_no_action() -> None:
    model, inputs = HandWrittenPostLN(), (_x(8, 10, WIDTH),)
    recs = [r for f in gradscope.analyze(model, inputs).findings if f.rule == "GS703"
            for r in f.recommendations if r.kind == "normalization"]
    assert recs and all(r.action is None for r in recs)


def test_residual_wraps_consecutive_children() -> None:
    model, inputs = _mlp(40, nn.ReLU, std_gain_sq=1.0), (_x(64, WIDTH),)
    rec = _with_op(gradscope.analyze(model, inputs), "residual")
    assert rec.action is not None and rec.verified is not None
    spans = rec.action["spans"]
    assert len(spans) == len(rec.targets) == 20
    assert spans[0] == ["0", "3"]
    fixed = _applied(model, rec, inputs)
    assert [name for name, _ in fixed.named_children()] == \
        [str(i) for i in range(81) if not any(int(a) < i <= int(b) for a, b in spans)]
    for first, last in spans:
        wrapper = fixed.get_submodule(first)
        assert isinstance(wrapper, Residual) and wrapper.scale == rec.action["scale"]
        wrapped = list(range(int(first), int(last) + 1))
        assert list(wrapper.block._modules) == [str(i) for i in wrapped]
        for i in wrapped:  # the model's own children, in order, weights untouched
            inner, original = wrapper.block.get_submodule(str(i)), model[i]
            assert type(inner) is type(original)
            assert all(torch.equal(p, q) for p, q in zip(inner.parameters(),
                                                           original.parameters(), strict=True))
    # each wrapper computes x + scale * block(x), the block being the original children
    wrapper, x = fixed.get_submodule(spans[0][0]), _x(5, WIDTH)
    a, b = (int(v) for v in spans[0])
    assert torch.allclose(wrapper(x), x + wrapper.scale * model[a:b + 1](x))
    _same_magnitude(_entry_figure(fixed, inputs), rec.verified.after)


def test_insert_norm_after_hidden_layers() -> None:
    model, inputs = _mlp(12, nn.ReLU, std_gain_sq=6.0), (_x(64, WIDTH),)
    report = gradscope.analyze(model, inputs)
    rec = _with_op(report, "insert_norm")
    assert rec.action is not None and rec.verified is not None
    assert set(rec.action["norms"]) == {"LayerNorm"}
    assert rec.action["modules"] == [str(i) for i in range(0, 24, 2)]
    fixed = _applied(model, rec, inputs)
    for name in rec.action["modules"]:
        slot = fixed.get_submodule(name)
        assert isinstance(slot, nn.Sequential) and isinstance(slot[1], nn.LayerNorm)
        assert slot[0] is not model.get_submodule(name)  # a copy was changed
        assert torch.equal(slot[0].weight, model.get_submodule(name).weight)
    _same_magnitude(_entry_figure(fixed, inputs, "high"), rec.verified.after)


# -- the input forms and the errors ---------------------------------------------------

@pytest.fixture(scope="module")
def sigmoid_report() -> tuple[nn.Module, tuple[Any, ...], Report]:
    model, inputs = _mlp(10, nn.Sigmoid), (_x(64, WIDTH),)
    return model, inputs, gradscope.analyze(model, inputs)


def test_json_form_applies_the_same(sigmoid_report: Any) -> None:
    model, _, report = sigmoid_report
    rec = _with_op(report, "swap_activation")
    doc = report.to_dict()
    as_json = next(r for f in doc["findings"] for r in f["recommendations"]
                   if r["action"] == rec.action)
    a = apply(copy.deepcopy(model), rec, seed=3)
    b = apply(copy.deepcopy(model), as_json, seed=3)
    c = apply(copy.deepcopy(model), as_json["action"], seed=3)
    for other in (b, c):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in a.state_dict().items())
    d = apply(copy.deepcopy(model), rec, seed=4)
    assert not torch.equal(a.state_dict()["0.weight"], d.state_dict()["0.weight"])


def test_unknown_module_raises(sigmoid_report: Any) -> None:
    model, _, report = sigmoid_report
    rec = _with_op(report, "residual")
    assert rec.action is not None
    action = {**rec.action, "spans": [["0", "99"]]}
    with pytest.raises(FixError, match="'99' does not exist") as info:
        apply(copy.deepcopy(model), action)
    assert "\n" not in info.value.one_line()
    with pytest.raises(FixError, match="not exist"):
        apply(copy.deepcopy(model), {"op": "zero_bias", "modules": ["nope.0"]})
    with pytest.raises(FixError, match="is a Linear, not Sigmoid"):
        apply(copy.deepcopy(model), {"op": "swap_activation", "from": ["Sigmoid"],
                                     "to": "ReLU", "modules": ["0"]})
    with pytest.raises(FixError, match="unknown action op"):
        apply(copy.deepcopy(model), {"op": "prune"})


@pytest.mark.parametrize("action", [{"op": "clip_grad_norm", "max_norm": 1.0},
                                    {"op": "warmup", "steps": 30, "start_factor": 0.1},
                                    {"op": "learning_rate", "lr": 1e-3}])
def test_training_loop_actions_are_refused(action: dict[str, Any]) -> None:
    with pytest.raises(FixError, match="training loop"):
        apply(nn.Linear(2, 2), action)


def test_clip_action_carries_the_threshold_in_the_text() -> None:
    model, inputs = _mlp(12, nn.ReLU, std_gain_sq=6.0), (_x(64, WIDTH),)
    clips = [r for r in _recs(gradscope.analyze(model, inputs)) if r.kind == "gradient_clipping"]
    assert clips
    for rec in clips:
        assert rec.action is not None and rec.action["op"] == "clip_grad_norm"
        assert f"max_norm={rec.action['max_norm']:g}" in (rec.code or "")


# -- snippets -------------------------------------------------------------------------

_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]] = {
    "sigmoid": lambda: (_mlp(10, nn.Sigmoid), (_x(64, WIDTH),)),
    "functional tanh": lambda: (FunctionalTanh(), (_x(64, WIDTH),)),
    "negative bias": lambda: (_mlp(6, nn.ReLU, bias=-3.0), (_x(64, WIDTH),)),
    "lstm": lambda: (Recurrent("lstm"), (_x(8, 60, 8),)),
    "rnn": lambda: (Recurrent("rnn"), (_x(8, 60, 8),)),
}


def _named_in_snippet(code: str) -> list[str]:
    """String constants passed to get_submodule, or in a list a loop feeds to it."""
    tree = ast.parse(code)
    names: list[str] = []
    uses_loop_names = "get_submodule(name)" in code
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get_submodule":
            names += [a.value for a in node.args if isinstance(a, ast.Constant)]
        if uses_loop_names and isinstance(node, ast.For) and isinstance(node.iter, ast.List):
            names += [e.value for e in node.iter.elts if isinstance(e, ast.Constant)]
    return [str(n) for n in names]


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_snippets_compile_and_name_modules_that_exist(name: str) -> None:
    model, inputs = _MODELS[name]()
    modules = dict(model.named_modules())
    checked = 0
    for rec in _recs(gradscope.analyze(model, inputs)):
        if not rec.code:
            continue
        compile(rec.code, f"<{rec.kind}>", "exec")
        for module in _named_in_snippet(rec.code):
            assert module in modules, (module, rec.code)
            checked += 1
        for module in (rec.action or {}).get("modules", []):
            assert module in modules, (module, rec.action)
    if name in ("negative bias", "lstm", "rnn"):
        assert checked  # these snippets name modules: the check above ran


# -- the sample models ----------------------------------------------------------------

def _model_actions(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    for finding in doc["findings"]:
        for rec in finding["recommendations"]:
            key = repr(rec["action"])
            if rec["action"] is not None and key not in seen:
                seen.add(key)
                yield rec


def _modules_named(action: dict[str, Any]) -> list[str]:
    names = list(action.get("modules", [])) + list(action.get("final_norm", {}))
    names += [n for span in action.get("spans", []) for n in span]
    for step in action.get("actions", []):
        names += _modules_named(step)
    return names


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_actions_name_real_modules_and_apply(sample_report: Any, name: str) -> None:
    """Every action of every sample report names modules the model has, and each model
    action, applied to a copy from the report's JSON, leaves a model that runs."""
    loaded, _, doc = sample_report(name)
    modules = dict(loaded.model.named_modules())
    out = loaded.model(*loaded.inputs)
    for rec in _model_actions(doc):
        action = rec["action"]
        assert set(_modules_named(action)) <= set(modules), action
        if action["op"] in LOOP_OPS:
            with pytest.raises(FixError, match="training loop"):
                apply(copy.deepcopy(loaded.model), rec)
            continue
        assert rec["verified"] is not None, rec["text"]  # only verified changes are applied
        fixed = apply(copy.deepcopy(loaded.model), rec)
        result = fixed(*loaded.inputs)
        assert getattr(result, "shape", None) == getattr(out, "shape", None)
