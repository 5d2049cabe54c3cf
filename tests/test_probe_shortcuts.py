"""The probe's side of issue 15 (analyze at the cost of its passes): shortcuts that must
answer exactly what the full computation answers.

The runtime recorder's replay skips the build's bookkeeping and must still name and
observe the nodes the build recorded; ``tensor_leaves`` answers a plain tensor without
pytree; the gradient hook checks finiteness on the Python float it already has.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from gradscope.probe import _Accumulator
from gradscope.tracing import ops, trace_model
from gradscope.tracing.graph import tensor_leaves
from gradscope.tracing.runtime import _Recorder

# ---------------------------------------------------------------------------
# The runtime recorder's replay


class _NormedTable(nn.Module):
    """A module applied to a weight (DeBERTa's LayerNorm of its position table), then an
    activation's ``detach``: the build records a ``detach`` of the weight module's output
    from inside its hook, which takes a name the later ``detach`` would otherwise get."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(4, 8))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rel = self.norm(self.table)
        h = torch.relu(self.fc(x))
        if h.sum() > -1e9:  # data-dependent: only the runtime recorder follows it
            h = h + h.detach() * 0.5
        return h @ rel.T


class _Mixed(nn.Module):
    """Whole modules (MHA, LayerNorm), functions, methods, a constant, a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, _ = self.attn(x, x, x, need_weights=False)
        h = self.norm(x + y)
        scale = torch.tensor(0.5)
        h = self.fc(h).transpose(1, 2).contiguous().transpose(1, 2) * scale
        if float(h.abs().max()) > 1e9:
            h = h * 0
        return h.sum(-1), torch.tanh(h)


class _Cells(nn.Module):
    """A module called twice, a weight transform (``w.T``) and a chunk (several outputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = torch.tanh(self.fc(x))
        a, b = (x @ self.w.T).chunk(2, dim=-1)
        if bool(a.sum() > -1e9):
            a = a.sigmoid()
        return torch.cat([a, b], dim=-1)


_REPLAYED = [(_NormedTable, (3, 8)), (_Mixed, (2, 5, 8)), (_Cells, (3, 8))]


@pytest.mark.parametrize(("cls", "shape"), _REPLAYED, ids=lambda v: getattr(v, "__name__", ""))
def test_replay_observes_every_recorded_node_once_in_order(cls: type[nn.Module],
                                                            shape: tuple[int, ...]) -> None:
    """The probe's replay skips the build's work (caller lines, argument references,
    weight folding, producers) and names each node from the same counters: it must
    observe exactly the nodes the build recorded (not weights), in forward order, each
    with an output of its recorded shape. A name shifted by one (a skipped ``_fresh``)
    lands on another node or nowhere, and fails here."""
    model = cls()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    traced = trace_model(model, (x,), method="runtime")
    observed: list[tuple[str, Any]] = []
    traced.runner.run((x,), lambda name, value: observed.append((name, value)))
    expected = [n for n in traced.order() if traced.node(n).role != "param"]
    assert [n for n, _ in observed] == expected
    for name, value in observed:
        leaves = tensor_leaves(value)
        shape_of = traced.node(name).shape
        if leaves and shape_of is not None:
            assert tuple(leaves[0].shape) == tuple(shape_of), name


def test_replay_keeps_the_name_the_weight_modules_detach_takes() -> None:
    """The model above really has the case: the activation's ``detach`` is a recorded
    layer whose name comes after the weight module's own ``detach``."""
    traced = trace_model(_NormedTable(), (torch.randn(3, 8),), method="runtime")
    roles = [traced.node(n).role for n in traced.order() if n.startswith("detach")]
    assert roles == ["param", "compute"]


def test_replay_gives_the_probe_the_same_figures_as_the_build_recorder() -> None:
    """The observer sees the same tensors (the same values) as a build would hand it."""
    model = _Mixed()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    traced = trace_model(model, (x,), method="runtime")
    replayed: dict[str, torch.Tensor] = {}
    traced.runner.run((x,), lambda n, v: replayed.setdefault(n, tensor_leaves(v)[0]))
    built: dict[str, torch.Tensor] = {}
    recorder = _Recorder(model, None, lambda n, v: built.setdefault(n, tensor_leaves(v)[0]))
    from gradscope.tracing.runtime import _recording

    with _recording(model, recorder):
        recorder.add_inputs((x,))
        model(x)
    assert replayed.keys() == built.keys()
    for name, value in replayed.items():
        assert torch.equal(value, built[name]), name


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __call__(self) -> None:  # pragma: no cover - only named
        return None


def test_recorder_names_functions_as_ops_does_and_caches_nothing_unhashable() -> None:
    recorder = _Recorder(nn.Linear(2, 2), None, None)
    funcs: list[Any] = [torch.relu, torch.Tensor.add, torch.Tensor.relu_, torch.nn.functional.gelu,
                        _Unhashable()]
    for func in funcs + funcs:  # the second round reads the cache
        assert recorder._function_name(func) == ops.function_name(func)
    assert not any(isinstance(k, _Unhashable) for k in recorder.names)


# ---------------------------------------------------------------------------
# tensor_leaves


class _Sub(torch.Tensor):
    pass


def test_tensor_leaves_plain_tensors_and_containers_as_pytree_flattens_them() -> None:
    t = torch.ones(2)
    p = nn.Parameter(torch.zeros(3))
    for value in (t, p, (t, [p, {"a": t}]), [1, "x"], None, t.as_subclass(_Sub)):
        flat, _ = torch.utils._pytree.tree_flatten(value)
        expected = [v for v in flat if isinstance(v, torch.Tensor)]
        got = tensor_leaves(value)
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True))


# ---------------------------------------------------------------------------
# The probe's gradient check on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_gradient_hook_flags_exactly_the_nonfinite_gradients(dtype: torch.dtype) -> None:
    traced = trace_model(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),))
    acc = _Accumulator(traced)
    hook = acc._hook("n")
    hook(torch.ones(5, dtype=dtype))
    hook(torch.tensor([1.0, float("inf")], dtype=dtype))
    hook(torch.tensor([float("nan"), 0.0], dtype=dtype))
    assert acc.bad_grad["n"] == [False, True, True]
    assert all(isinstance(f, bool) for f in acc.bad_grad["n"])
    first, inf, nan = acc.sq["n"]
    assert math.isclose(first, 5.0) and math.isinf(inf) and math.isnan(nan)


# ---------------------------------------------------------------------------
# The loss's seeded draw, kept across a probe's batches


@pytest.mark.parametrize("loss", ["dot", "mse", "cross_entropy", "sum"])
def test_loss_draw_kept_across_batches_is_the_same_draw(loss: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch's loss is what a fresh draw gives, and the draw is made once."""
    from gradscope.probe import _loss

    torch.manual_seed(0)
    outs = [torch.randn(4, 5, 7) for _ in range(3)]
    fresh = [_loss(out, (), loss, 3) for out in outs]
    draws = {"randn": 0, "randint": 0}
    for fn in draws:
        real = getattr(torch, fn)

        def counted(*args: Any, _real: Any = real, _fn: str = fn, **kwargs: Any) -> Any:
            draws[_fn] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, fn, counted)
    drawn: dict[Any, torch.Tensor] = {}
    for out, (value, text) in zip(outs, fresh, strict=True):
        kept, kept_text = _loss(out, (), loss, 3, drawn=drawn)
        assert kept_text == text
        assert torch.equal(kept, value)
    monkeypatch.undo()
    assert sum(draws.values()) == (0 if loss == "sum" else 1)  # drawn once for 3 batches
    assert len(drawn) == (0 if loss == "sum" else 1)
    # Another seed or shape is another draw, not the kept one.
    other, _ = _loss(outs[0], (), loss, 4, drawn=drawn)
    assert torch.equal(other, _loss(outs[0], (), loss, 4)[0])
    assert len(drawn) == (0 if loss == "sum" else 2)
