"""Caches of facts read from weight (and input) values, kept across the static estimates of
one traced model: every verified fix re-estimates the graph on the same tensors (issue 15).

Each must not answer for a tensor changed in place, nor for another tensor that took a
freed one's id, and must answer exactly what the uncached computation answers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gradscope.estimate import statistics, tied
from gradscope.estimate.statistics import statistics_scope, tensor_stats
from gradscope.tracing import TracedModel, trace_model

# ---------------------------------------------------------------------------
# The measurement cache: views by the tensor they view


def test_views_of_one_weight_are_measured_once_and_correctly(monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    """nn.MultiheadAttention's rules chunk ``in_proj_weight`` afresh on every call: the
    same chunk is read from the cache, a different chunk is not."""
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    calls: list[torch.Tensor] = []
    real = statistics._measure
    monkeypatch.setattr(statistics, "_measure", lambda t: (calls.append(t), real(t))[1])
    cache: dict[Any, Any] = {}
    for _ in range(3):
        with statistics_scope(cache=cache):
            got = [tensor_stats(c) for c in weight.chunk(3)]
        for c, m in zip(weight.chunk(3), got, strict=True):
            x = c.double()
            assert m == (float(x.mean()), float((x * x).mean()))
    assert len(calls) == 3  # one per chunk, not one per chunk per call
    # same elements seen another way (a transpose) is another key, not a wrong hit
    with statistics_scope(cache=cache):
        assert tensor_stats(weight.chunk(3)[0].T) == real(weight.chunk(3)[0])


def test_a_view_after_an_in_place_change_of_its_weight_is_measured_again() -> None:
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    cache: dict[Any, Any] = {}
    with statistics_scope(cache=cache):
        before = tensor_stats(weight.chunk(3)[1])
        with torch.no_grad():
            weight.mul_(3.0)
        after = tensor_stats(weight.chunk(3)[1])
    x = weight.chunk(3)[1].double()
    assert after == (float(x.mean()), float((x * x).mean()))
    assert after != before


def test_a_view_entry_keeps_its_weight_so_no_other_tensor_takes_its_id() -> None:
    """The entry holds the viewed tensor: while the cache lives, its id is not reused."""
    cache: dict[Any, Any] = {}
    weight = torch.randn(6, 4)
    key = None
    with statistics_scope(cache=cache):
        tensor_stats(weight.chunk(3)[0])
        (key, (owner, _)), = cache.items()
    assert owner is weight and key[1] == id(weight)
    # an entry left by a freed weight whose id came back must not answer
    other = torch.full((6, 4), 2.0)
    fake = {(key[0], id(other), *key[2:]): (torch.zeros(6, 4), (0.0, 0.0))}
    with statistics_scope(cache=fake):
        assert tensor_stats(other.chunk(3)[0]) == (2.0, 4.0)


# ---------------------------------------------------------------------------
# The equal-weights search's facts, kept across estimates


def _stack(equal: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(3)]
    if equal:
        for layer in layers[1:]:
            layer.load_state_dict(layers[0].state_dict())
    return nn.Sequential(*layers)


def _traced(model: nn.Module) -> TracedModel:
    return trace_model(model, (torch.randn(4, 8),))


def test_equal_weights_found_again_after_an_in_place_change_are_not_stale() -> None:
    model = _stack(equal=True)
    traced = _traced(model)
    assert tied._has_equal_weights(traced)
    assert traced.weight_facts  # fingerprints and equalities were kept
    with torch.no_grad():
        for k, layer in enumerate(list(model)[1:]):
            layer.weight.add_(torch.randn(8, 8))  # type: ignore[operator]
            layer.bias.add_(k + 1.0)  # type: ignore[operator]
    assert not tied._has_equal_weights(traced)
    with torch.no_grad():
        for layer in list(model)[1:]:
            layer.load_state_dict(model[0].state_dict())
    assert tied._has_equal_weights(traced)


def test_weight_facts_answer_only_for_the_tensor_they_hold() -> None:
    """A fact left by a freed tensor whose id and version another tensor now has."""
    t = torch.arange(8.0)
    other = torch.arange(8.0) * 2
    key = ("fingerprint", (id(t), t._version))
    facts: dict[Any, Any] = {key: ((other,), ("stale",))}
    classes = tied._Classes(facts)
    assert classes.of(t) is not None
    assert facts[key] == ((t,), tied._fingerprint(t))
    calls: list[int] = []
    value = statistics.cached_fact(facts, "x", (t,), lambda: calls.append(1) or 5)
    assert value == 5 and statistics.cached_fact(facts, "x", (t,), lambda: 6) == 5 and calls == [1]


# ---------------------------------------------------------------------------
# Smaller shortcuts of the sweep


def test_chi2_log_stats_cache_answers_as_the_function_does() -> None:
    from gradscope.estimate.fluctuation import chi2_log_stats

    for dof in (1.0, 2.5, 64.0, 256.0, 64.0, 0.0, -3.0, float("inf"), float("nan")):
        assert chi2_log_stats(dof) == chi2_log_stats.__wrapped__(dof)


class _Slope(nn.LeakyReLU):
    scale = 2.5  # a class attribute

    @property
    def alpha(self) -> float:  # a property
        return 0.25


class _Dynamic(nn.ReLU):
    """A module whose own ``__getattr__`` answers any name with a number."""

    def __getattr__(self, name: str) -> Any:
        if name in ("beta", "threshold"):
            return 7.0
        return super().__getattr__(name)


def test_activation_attributes_read_as_getattr_reads_them() -> None:
    from gradscope.estimate.ops_activation import _ACT_PARAMS, _plain_attr

    lrelu = nn.LeakyReLU(0.2)
    lrelu.lambd = 0.5  # an instance attribute set later
    modules: list[nn.Module] = [nn.ReLU(), lrelu, nn.ELU(0.3), nn.Hardtanh(-2, 3),
                                nn.Softplus(2, 10), nn.GELU("tanh"), _Slope(0.1), _Dynamic(),
                                nn.PReLU()]
    modules[-1].register_buffer("threshold", torch.ones(1))

    def kept(value: Any) -> Any:  # what _activation_params keeps of a value
        plain = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        return value if plain else None

    for module in modules:
        for attr in (*_ACT_PARAMS, "weight", "training", "inplace"):
            assert kept(_plain_attr(module, attr)) == kept(getattr(module, attr, None)), \
                (module, attr)
    assert _plain_attr(_Dynamic(), "beta") == 7.0 and _plain_attr(_Slope(), "alpha") == 0.25


def test_unit_mean_fan_counts_as_the_first_rows_size() -> None:
    from gradscope.estimate.ops_dense import unit_mean_fan

    class _Ctx:
        class data:  # shaped like Ctx.data
            key = "linear"

    for shape in ((4, 3), (5,), (2, 3, 4, 5), (1, 7)):
        w = torch.zeros(shape)
        assert unit_mean_fan(_Ctx(), w) == float(w[0].numel())  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        unit_mean_fan(_Ctx(), torch.zeros(0, 3))  # type: ignore[arg-type]


def test_input_spread_is_read_again_after_the_input_changes() -> None:
    from gradscope.estimate.engine import estimate
    from gradscope.estimate.statistics import unit_means_spread

    model = _stack(equal=False)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    traced = trace_model(model, (x,))
    first = estimate(traced, (x,))
    key = ("unit_means_spread", (id(x), x._version))
    assert traced.weight_facts[key] == ((x,), unit_means_spread(x))
    with torch.no_grad():
        x[:, 0] += 5.0
    again = estimate(traced, (x,))
    fresh = estimate(trace_model(model, (x,)), (x,))
    assert again.moments == fresh.moments and again.health == fresh.health
    assert again.moments != first.moments
