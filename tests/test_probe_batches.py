"""The multi-batch probe (issue 4) against brute force written here, and its guarantees.

Every number is recomputed in plain eager PyTorch: forward hooks that
``retain_grad`` on module outputs, ``loss.backward()`` per batch, loops over
``named_parameters()`` and real ``torch.optim`` steps. Only the probe batches
themselves come from gradscope (``gradscope.probe.make_batches``, tested on its
own first), so the brute force sees the same inputs.

The probe's definitions being checked (gradscope/probe.py):

* the loss is recomputed for every batch from a CPU generator seeded with
  ``seed + 1``: ``dot`` = ``sum(out * randn(out.shape))`` (the same direction
  for every batch), ``sum``, ``mse`` against ``randn(out.shape)``,
  ``cross_entropy`` against ``randint(0, C, (n,))`` over the last dim, or a
  ``loss_fn(output, inputs)``;
* ``probe_grad_rms`` = sqrt(sum over batches of ||g||^2 / total numel) divided
  by the same figure at the model output; ``probe_grad_rms_min/max`` the
  extremes over batches of the per-batch ratio;
* ``param_grad_ratio`` = sqrt(mean over batches of ||grad W||^2) / ||W||,
  ``update_ratio`` the same with the first optimiser step instead of grad W;
* ``dead_fraction`` = share of units (all dims but the batch) never active on
  any sample of any batch.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import cli_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import gradscope
from gradscope.cli import main
from gradscope.errors import ModelRunError
from gradscope.probe import make_batches
from gradscope.schema import validate_report

SEED = 0
BATCHES = 3
RTOL = 1e-4

WEIGHT_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d)
OBSERVED_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.ReLU, nn.Tanh, nn.BatchNorm1d,
                  nn.BatchNorm2d, nn.Dropout)
OOM_ERROR: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or \
    torch.cuda.OutOfMemoryError

LOSS_TEXT = "loss_fn(output, inputs)"


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# 1. make_batches


def test_make_batches_shapes_dtypes_and_statistics() -> None:
    x = _randn(64, 32, seed=1) * 2.0 + 3.0  # mean ~3, std ~2
    half = (_randn(16, 8, seed=2) * 0.5 - 1.0).half()
    ids = torch.randint(5, 21, (32, 40), generator=torch.Generator().manual_seed(3))
    ids32 = ids.to(torch.int32)
    mask = torch.rand(64, 64, generator=torch.Generator().manual_seed(4)) < 0.25
    inputs = (x, half, ids, ids32, mask, 7, None)

    batches = make_batches(inputs, 4, seed=SEED)
    assert len(batches) == 4
    # The first batch is the example itself, untouched.
    assert len(batches[0]) == len(inputs)
    assert all(a is b for a, b in zip(batches[0], inputs, strict=True))

    n = x.numel()
    ref_mean, ref_std = float(x.double().mean()), float(x.double().std())
    for k, batch in enumerate(batches[1:], start=1):
        assert len(batch) == len(inputs)
        gx, ghalf, gids, gids32, gmask, const, none = batch
        for got, ref in ((gx, x), (ghalf, half), (gids, ids), (gids32, ids32), (gmask, mask)):
            assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
            assert not torch.equal(got, ref), k  # a new draw, not a copy of the example
        # Floats: mean within 5 standard errors, std within 5 of its standard errors.
        mean, std = float(gx.double().mean()), float(gx.double().std())
        assert abs(mean - ref_mean) < 5 * ref_std / math.sqrt(n), (k, mean, ref_mean)
        assert abs(std / ref_std - 1) < 5 / math.sqrt(2 * n), (k, std, ref_std)
        hmean, hstd = float(half.double().mean()), float(half.double().std())
        assert abs(float(ghalf.double().mean()) - hmean) < 5 * hstd / math.sqrt(half.numel())
        assert abs(float(ghalf.double().std()) / hstd - 1) < 5 / math.sqrt(2 * half.numel())
        # Integers: inside the example's range, and spread over it.
        for got, ref in ((gids, ids), (gids32, ids32)):
            assert int(got.min()) >= int(ref.min()) and int(got.max()) <= int(ref.max())
            assert len(torch.unique(got)) > len(torch.unique(ref)) // 2
        # Booleans keep their share of True.
        share, ref_share = float(gmask.float().mean()), float(mask.float().mean())
        se = math.sqrt(ref_share * (1 - ref_share) / mask.numel())
        assert abs(share - ref_share) < 5 * se, (k, share, ref_share)
        # Non-tensors are handed on as they are.
        assert const == 7 and none is None
    # The extra batches differ from one another, too.
    assert not torch.equal(batches[1][0], batches[2][0])
    assert not torch.equal(batches[2][2], batches[3][2])


def test_make_batches_is_deterministic_per_seed() -> None:
    inputs = (_randn(8, 5, seed=5), torch.randint(0, 100, (8, 6),
                                                 generator=torch.Generator().manual_seed(6)))
    torch.manual_seed(123)
    first = make_batches(inputs, 3, seed=0)
    torch.rand(10)  # the global RNG does not matter
    again = make_batches(inputs, 3, seed=0)
    other = make_batches(inputs, 3, seed=1)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    for k in (1, 2):
        assert all(not torch.equal(s, t) for s, t in zip(first[k], other[k], strict=True))
    # The example stays first whatever the seed, and one batch means just the example.
    assert all(s is t for s, t in zip(other[0], inputs, strict=True))
    only = make_batches(inputs, 1, seed=0)
    assert len(only) == 1 and all(s is t for s, t in zip(only[0], inputs, strict=True))


def test_make_batches_constant_input() -> None:
    """std 0 and a one-value integer range: the extra batches are that constant."""
    x = torch.full((4, 3), 2.5)
    ids = torch.full((4, 3), 9, dtype=torch.int64)
    for batch in make_batches((x, ids), 3, seed=0)[1:]:
        assert torch.equal(batch[0], x) and torch.equal(batch[1], ids)


# ---------------------------------------------------------------------------
# Brute force


def _rms_of_sq(sq: float, numel: int) -> float:
    return math.sqrt(sq / numel)


def _sq(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).sum())


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().norm())


def brute_loss(out: torch.Tensor, inputs: tuple[Any, ...], loss: str | Callable[..., Any],
               seed: int) -> torch.Tensor:
    """The probe's loss, rebuilt from its definition."""
    if callable(loss):
        return loss(out, inputs)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    if loss == "sum":
        return out.sum()
    if loss == "mse":
        target = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.dtype)
        return ((out - target) ** 2).mean()
    if loss == "cross_entropy":
        classes = out.shape[-1]
        logits = out.reshape(-1, classes).float()
        target = torch.randint(0, classes, (logits.shape[0],), generator=g)
        return -logits.log_softmax(-1).gather(1, target[:, None]).mean()
    r = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.dtype)
    return (out * r).sum()


def _keeper(name: str, outputs: dict[str, torch.Tensor],
            active: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A forward hook keeping the module's output (retain_grad) and, for ReLU, its live units."""
    def fn(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.ReLU):
            active[name] = (out.detach() > 0).any(dim=0)
        out.retain_grad()
        outputs[name] = out
        return out.clone()  # the same gradient, safe from later in-place ops
    return fn


def run_batches(model: nn.Module, batches: list[tuple[Any, ...]], *, loss: Any = "dot",
                seed: int = SEED, mode: str = "train") -> list[dict[str, Any]]:
    """Forward and backward each batch on a deep copy of ``model``; one record per batch."""
    model = copy.deepcopy(model)
    model.train(mode == "train")
    torch.manual_seed(seed)
    records = []
    for batch in batches:
        outputs: dict[str, torch.Tensor] = {}
        active: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(_keeper(n, outputs, active))
                   for n, m in model.named_modules() if isinstance(m, OBSERVED_TYPES)]
        try:
            xin = tuple(t.detach().clone().requires_grad_(t.is_floating_point())
                        if isinstance(t, torch.Tensor) else t for t in batch)
            out = model(*xin)
        finally:
            for h in handles:
                h.remove()
        out.retain_grad()
        model.zero_grad(set_to_none=True)
        brute_loss(out, xin, loss, seed).backward()
        records.append({
            "sq": {n: _sq(t.grad) for n, t in outputs.items()},
            "numel": {n: t.numel() for n, t in outputs.items()},
            "input_sq": _sq(xin[0].grad), "input_numel": xin[0].numel(),
            "out_sq": _sq(out.grad), "out_numel": out.numel(),
            "active": active,
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None},
        })
    return records


def expected_figures(model: nn.Module, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's per-node numbers, aggregated from the per-batch records."""
    out_sq = sum(r["out_sq"] for r in records)
    out_numel = sum(r["out_numel"] for r in records)
    out_rms = _rms_of_sq(out_sq, out_numel)
    names = records[0]["sq"]
    grad_rms, spread = {}, {}
    for name in names:
        sq = sum(r["sq"][name] for r in records)
        numel = sum(r["numel"][name] for r in records)
        grad_rms[name] = _rms_of_sq(sq, numel) / out_rms
        ratios = [_rms_of_sq(r["sq"][name], r["numel"][name])
                  / _rms_of_sq(r["out_sq"], r["out_numel"]) for r in records]
        spread[name] = (min(ratios), max(ratios))
    grad_rms["<input>"] = _rms_of_sq(sum(r["input_sq"] for r in records),
                                     sum(r["input_numel"] for r in records)) / out_rms
    ratio, norm = {}, {}
    for pname, p in model.named_parameters():
        if pname.endswith(".weight"):
            owner = pname.rsplit(".", 1)[0]
            mean_sq = sum(_sq(r["grads"][pname]) for r in records) / len(records)
            norm[owner] = math.sqrt(mean_sq)
            ratio[owner] = math.sqrt(mean_sq) / _norm(p)
    dead = {}
    for name in records[0]["active"]:
        union = records[0]["active"][name].clone()
        for r in records[1:]:
            union |= r["active"][name]
        dead[name] = 1.0 - float(union.double().mean())
    return {"grad_rms": grad_rms, "spread": spread, "param_grad_ratio": ratio,
            "param_grad_norm": norm, "dead": dead, "output_grad_rms": out_rms}


def real_update_ratio(model: nn.Module, records: list[dict[str, Any]], optimizer: str,
                      lr: float, weight_decay: float) -> dict[str, float]:
    """sqrt(mean over batches of ||W1 - W0||^2) / ||W0||, with a real optimiser step per batch."""
    sq: dict[str, float] = {}
    for r in records:
        clone = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in clone.named_parameters()}
        for n, p in clone.named_parameters():
            p.grad = r["grads"][n].clone()
        params = list(clone.parameters())
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9,
                                                         weight_decay=weight_decay)
        elif optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        opt.step()
        for n, p in clone.named_parameters():
            if n.endswith(".weight"):
                owner = n.rsplit(".", 1)[0]
                delta = p.detach().double() - before[n].double()
                sq[owner] = sq.get(owner, 0.0) + float(delta.pow(2).sum())
    weights = dict(model.named_parameters())
    return {o: math.sqrt(v / len(records)) / _norm(weights[f"{o}.weight"]) for o, v in sq.items()}


def by_module(report: gradscope.Report) -> dict[str, Any]:
    """Report layers keyed by module path; each checked module must have one node."""
    found: dict[str, Any] = {}
    for layer in report.layers:
        if layer.module is None or layer.op in ("input", "output"):
            continue
        assert layer.module not in found, f"two nodes for module {layer.module}"
        found[layer.module] = layer
    return found


def input_layer(report: gradscope.Report) -> Any:
    return next(layer for layer in report.layers if layer.op == "input")


def observed(model: nn.Module, types: tuple[type, ...] = OBSERVED_TYPES) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def assert_matches(model: nn.Module, report: gradscope.Report, expected: dict[str, Any],
                   spread: bool = True, skip: tuple[str, ...] = ()) -> None:
    layers = by_module(report)
    for name in observed(model):
        if name in skip:
            continue
        got = layers[name]
        assert got.probe_grad_rms == pytest.approx(expected["grad_rms"][name], rel=RTOL), name
        if spread:
            lo, hi = expected["spread"][name]
            assert got.probe_grad_rms_min == pytest.approx(lo, rel=RTOL), name
            assert got.probe_grad_rms_max == pytest.approx(hi, rel=RTOL), name
    assert input_layer(report).probe_grad_rms == pytest.approx(expected["grad_rms"]["<input>"],
                                                               rel=RTOL)
    for name in observed(model, (*WEIGHT_TYPES, nn.BatchNorm1d, nn.BatchNorm2d)):
        got = layers[name]
        assert got.param_grad_ratio == pytest.approx(expected["param_grad_ratio"][name],
                                                     rel=RTOL), name
        assert got.param_grad_norm == pytest.approx(expected["param_grad_norm"][name],
                                                    rel=RTOL), name
    for name in observed(model, (nn.ReLU,)):
        assert layers[name].dead_fraction == pytest.approx(expected["dead"][name], abs=1e-6)
    assert report.probe.output_grad_rms == pytest.approx(expected["output_grad_rms"], rel=RTOL)


# ---------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(8, 16)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.act2 = nn.Tanh()
        self.fc3 = nn.Linear(16, 5)
        with torch.no_grad():
            self.fc1.bias[:3] = -50.0  # units 0-2 of act1 never fire

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 5)
        with torch.no_grad():
            self.bn.bias[0] = -50.0  # channel 0 of relu1 never fires
            self.bn.weight[1] = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.bn(self.conv1(x)))))
        return self.fc(h.flatten(1))


class EvalNet(nn.Module):
    """BatchNorm with non-trivial running statistics, and dropout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():
            self.bn.running_mean.copy_(_randn(16, seed=30))
            self.bn.running_var.copy_(_randn(16, seed=31).abs() * 3 + 0.2)
            self.bn.num_batches_tracked.fill_(17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.drop(self.bn(self.fc1(x)))))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mlp": (MLP, lambda: _randn(12, 8, seed=10)),
    "bn_cnn": (BNCNN, lambda: _randn(6, 3, 8, 8, seed=11)),
}


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    """Each model, its input, brute-force records over the probe batches, and its report."""
    built = {}
    for name, (make, inputs) in MODELS.items():
        model, x = make(), inputs()
        records = run_batches(model, make_batches((x,), BATCHES, SEED))
        report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES)
        built[name] = (model, x, records, report)
    return built


# ---------------------------------------------------------------------------
# 2. Multi-batch aggregation


@pytest.mark.parametrize("case", list(MODELS))
def test_multi_batch_figures_match_brute_force(measured: dict[str, Any], case: str) -> None:
    model, _, records, report = measured[case]
    assert report.probe.batches == BATCHES and report.probe.mode == "train"
    assert len(records) == BATCHES
    expected = expected_figures(model, records)
    assert_matches(model, report, expected)
    layers = by_module(report)
    # Not vacuous: the batches really differ somewhere, and the aggregate is not batch 1's.
    assert any(hi > lo * (1 + 1e-3) for lo, hi in expected["spread"].values())
    first = expected_figures(model, records[:1])
    assert any(first["grad_rms"][n] != pytest.approx(expected["grad_rms"][n], rel=1e-3)
               for n in observed(model))
    assert any(first["param_grad_ratio"][n] != pytest.approx(
        expected["param_grad_ratio"][n], rel=1e-3) for n in observed(model, WEIGHT_TYPES))
    # The killed units are seen as dead.
    assert any(layers[n].dead_fraction > 0 for n in observed(model, (nn.ReLU,)))


@pytest.mark.parametrize(("optimizer", "lr", "weight_decay"),
                         [("sgd", 0.5, 0.0), ("sgd", 0.5, 0.01), ("adam", 1e-2, 0.0),
                          ("adamw", 1e-2, 0.1)])
def test_update_ratio_is_averaged_over_batches(optimizer: str, lr: float,
                                               weight_decay: float) -> None:
    model, x = MLP(), _randn(12, 8, seed=10)
    records = run_batches(model, make_batches((x,), BATCHES, SEED))
    expected = real_update_ratio(model, records, optimizer, lr, weight_decay)
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES, lr=lr,
                               optimizer=optimizer, weight_decay=weight_decay, momentum=0.9)
    assert report.probe.lr == lr and report.probe.optimizer == optimizer
    layers = by_module(report)
    for name in observed(model, WEIGHT_TYPES):
        assert layers[name].update_ratio == pytest.approx(expected[name], rel=RTOL), name
    # The batches' updates differ (for SGD; Adam's first step is ~lr per element).
    if optimizer == "sgd":
        one = real_update_ratio(model, records[:1], optimizer, lr, weight_decay)
        assert any(one[n] != pytest.approx(expected[n], rel=1e-3) for n in expected)


def _units_active_in_one_batch(x: torch.Tensor) -> tuple[nn.Module, list[int]]:
    """A Linear+ReLU whose hidden unit k fires in batch k only (plus dead and live units).

    Unit k reads one signed input feature, with a threshold between the largest
    value of that feature in batch k and the largest in every other batch.
    """
    batches = [b[0] for b in make_batches((x,), BATCHES, SEED)]
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(x.shape[1], 8), nn.ReLU(), nn.Linear(8, 3))
    owner: list[int] = []
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-100.0)  # units 3-5 never fire
        for k in range(BATCHES):
            found = False
            for feature in range(x.shape[1]):
                for sign in (1.0, -1.0):
                    tops = [float((sign * b[:, feature]).max()) for b in batches]
                    others = max(t for j, t in enumerate(tops) if j != k)
                    if tops[k] > others + 0.05:
                        model[0].weight[k, feature] = sign
                        model[0].bias[k] = -(tops[k] + others) / 2
                        found = True
                        break
                if found:
                    break
            assert found, f"no feature singles out batch {k}"
            owner.append(k)
        model[0].bias[6:] = 1.0  # units 6-7 always fire
    return model, owner


def test_dead_fraction_is_over_all_batches() -> None:
    x = _randn(10, 6, seed=20)
    model, owner = _units_active_in_one_batch(x)
    records = run_batches(model, make_batches((x,), BATCHES, SEED))
    # Unit k fires in batch k and no other: the construction worked.
    for k in owner:
        fired = [bool(r["active"]["1"][k]) for r in records]
        assert fired == [j == k for j in range(BATCHES)], (k, fired)
    expected = expected_figures(model, records)["dead"]["1"]
    assert expected == pytest.approx(3 / 8)  # units 3-5
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES)
    got = by_module(report)["1"].dead_fraction
    assert got == pytest.approx(expected, abs=1e-6)
    # Any per-batch definition gives another number: dead in batch 1 alone, in the last
    # batch alone, or the mean of the per-batch fractions.
    per_batch = [1.0 - float(r["active"]["1"].double().mean()) for r in records]
    assert all(p != pytest.approx(got) for p in per_batch)
    assert sum(per_batch) / len(per_batch) != pytest.approx(got)


# ---------------------------------------------------------------------------
# 3. Loss options


@pytest.mark.parametrize(("loss", "text"), [("sum", "sum"), ("mse", "mse"),
                                            ("cross_entropy", "cross_entropy"),
                                            ("dot", "dot")])
def test_named_losses_match_brute_force(loss: str, text: str) -> None:
    model, x = MLP(), _randn(12, 8, seed=10)
    records = run_batches(model, make_batches((x,), BATCHES, SEED), loss=loss)
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES, loss=loss)
    assert report.probe.loss is not None and report.probe.loss.startswith(text)
    assert_matches(model, report, expected_figures(model, records))


def test_cross_entropy_over_the_last_dim_of_a_sequence_output() -> None:
    """(batch, seq, classes): one seeded class per position, the mean over positions."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 7))
    x = _randn(4, 5, 6, seed=21)
    records = run_batches(model, make_batches((x,), BATCHES, SEED), loss="cross_entropy")
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES,
                               loss="cross_entropy")
    assert_matches(model, report, expected_figures(model, records))


def _callable_loss(out: torch.Tensor, inputs: tuple[Any, ...]) -> torch.Tensor:
    """Uses the inputs too (its gradient reaches them directly, not only through the model)."""
    return (out.pow(2).mean() + (out[:, :2] * inputs[0][:, :2]).sum()) * 0.5


def test_callable_loss_matches_brute_force() -> None:
    model, x = MLP(), _randn(12, 8, seed=10)
    seen: list[tuple[Any, ...]] = []

    def loss_fn(out: torch.Tensor, inputs: tuple[Any, ...]) -> torch.Tensor:
        seen.append(inputs)
        return _callable_loss(out, inputs)

    batches = make_batches((x,), BATCHES, SEED)
    records = run_batches(model, batches, loss=_callable_loss)
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES, loss=loss_fn)
    assert report.probe.loss is not None and LOSS_TEXT in report.probe.loss
    assert_matches(model, report, expected_figures(model, records))
    # It was called once per batch with that batch's inputs.
    assert len(seen) == BATCHES
    for inputs, batch in zip(seen, batches, strict=True):
        assert torch.equal(inputs[0].detach(), batch[0])


@pytest.mark.parametrize("value", [lambda out, inputs: out,
                                   lambda out, inputs: out.sum(dim=0),
                                   lambda out, inputs: 3.0])
def test_non_scalar_callable_loss_is_a_clear_error(value: Callable[..., Any]) -> None:
    model, x = MLP(), _randn(12, 8, seed=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ModelRunError, match="scalar"):
        gradscope.analyze(model, x, device="cpu", loss=value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


MODEL_FILE = """\
import torch
import torch.nn.functional as F
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def example_inputs():
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1))


def loss_fn(output, inputs):
    {body}
"""
GOOD_LOSS = "return F.cross_entropy(output, (inputs[0][:, 0] > 0).long() * 3)"
BAD_LOSS = "return output * 2"


def _write_model(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "with_loss.py"
    path.write_text(MODEL_FILE.format(body=body), encoding="utf-8")
    return path


def _import(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"probe_batches_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml with [tool.gradscope] above
    return cli_runner().invoke(main, ["analyze", *args], catch_exceptions=False)


def _json_layers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {layer["module"]: layer for layer in doc["layers"]
            if layer.get("module") is not None and layer["op"] not in ("input", "output")}


@pytest.mark.parametrize("override", [None, "sum"])
def test_cli_uses_loss_fn_from_the_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              override: str | None) -> None:
    path = _write_model(tmp_path, GOOD_LOSS)
    args = [str(path), "--json", "-", "--device", "cpu", "--fail-on", "never"]
    if override:
        args += ["--loss", override]
    result = _cli(tmp_path, monkeypatch, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    validate_report(doc)
    module = _import(path)
    model, x = module.build_model(), module.example_inputs()
    if override:
        assert doc["probe"]["loss"].startswith("sum")
        loss: Any = "sum"
    else:
        assert LOSS_TEXT in doc["probe"]["loss"]
        loss = module.loss_fn
    expected = expected_figures(model, run_batches(model, make_batches((x,), 3, 0), loss=loss))
    layers = _json_layers(doc)
    for name in observed(model):
        assert layers[name]["probe_grad_rms"] == pytest.approx(expected["grad_rms"][name],
                                                               rel=RTOL), name
    for name in observed(model, WEIGHT_TYPES):
        assert layers[name]["param_grad_ratio"] == pytest.approx(
            expected["param_grad_ratio"][name], rel=RTOL), name


def test_cli_batches_mode_and_optimizer_options(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--batches, --probe-mode, --lr with --momentum and --weight-decay reach the probe."""
    path = _write_model(tmp_path, GOOD_LOSS)
    result = _cli(tmp_path, monkeypatch, str(path), "--json", "-", "--device", "cpu",
                  "--fail-on", "never", "--batches", "2", "--probe-mode", "eval",
                  "--lr", "0.5", "--optimizer", "sgd", "--momentum", "0.9",
                  "--weight-decay", "0.01", "--seed", "5")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    validate_report(doc)
    assert doc["probe"]["batches"] == 2 and doc["probe"]["mode"] == "eval"
    assert doc["probe"]["seed"] == 5 and doc["probe"]["optimizer"] == "sgd"
    module = _import(path)
    model, x = module.build_model(), module.example_inputs()
    records = run_batches(model, make_batches((x,), 2, 5), loss=module.loss_fn, seed=5,
                          mode="eval")
    expected = expected_figures(model, records)
    updates = real_update_ratio(model, records, "sgd", 0.5, 0.01)
    layers = _json_layers(doc)
    for name in observed(model):
        assert layers[name]["probe_grad_rms"] == pytest.approx(expected["grad_rms"][name],
                                                               rel=RTOL), name
    for name in observed(model, WEIGHT_TYPES):
        assert layers[name]["update_ratio"] == pytest.approx(updates[name], rel=RTOL), name


def test_cli_non_scalar_loss_fn_exits_2_with_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_model(tmp_path, BAD_LOSS)
    result = _cli(tmp_path, monkeypatch, str(path), "--json", "-", "--device", "cpu")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradscope: error: ") and "scalar" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # --loss on the command line replaces the broken loss_fn: the run then works.
    fixed = _cli(tmp_path, monkeypatch, str(path), "--json", "-", "--device", "cpu",
                 "--loss", "mse", "--fail-on", "never")
    assert fixed.exit_code == 0, fixed.stderr
    assert json.loads(fixed.stdout)["probe"]["loss"].startswith("mse")


# ---------------------------------------------------------------------------
# 4. probe_mode


def _mixed_flags(model: nn.Module) -> list[tuple[str, bool]]:
    model.train()
    model.bn.eval()
    model.fc2.eval()
    return [(n, m.training) for n, m in model.named_modules()]


def test_eval_mode_uses_running_stats_and_no_dropout() -> None:
    model, x = EvalNet(), _randn(10, 8, seed=22)
    flags = _mixed_flags(model)
    batches = make_batches((x,), BATCHES, SEED)
    records = run_batches(model, batches, mode="eval")
    expected = expected_figures(model, records)
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES,
                               probe_mode="eval")
    assert report.probe.mode == "eval"
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    # Dropout in eval mode hands its input on unchanged: an alias, not measured apart.
    assert_matches(model, report, expected, skip=("drop",))
    # Not vacuous: the same figures in train mode are different numbers.
    train = expected_figures(model, run_batches(model, batches, mode="train"))
    assert train["grad_rms"]["bn"] != pytest.approx(expected["grad_rms"]["bn"], rel=1e-2)
    assert train["param_grad_ratio"]["fc1"] != pytest.approx(
        expected["param_grad_ratio"]["fc1"], rel=1e-2)


def test_train_mode_restores_flags_and_statistics() -> None:
    model, x = EvalNet(), _randn(10, 8, seed=22)
    flags = _mixed_flags(model)
    stats = [b.clone() for b in model.bn.buffers()]
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES,
                               probe_mode="train")
    assert report.probe.mode == "train"
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(model.bn.buffers(), stats, strict=True))
    # The probe did run BatchNorm in train mode (batch statistics), not the running ones.
    evaluated = expected_figures(model, run_batches(model, make_batches((x,), 3, 0),
                                                    mode="eval"))
    assert by_module(report)["fc1"].param_grad_ratio != pytest.approx(
        evaluated["param_grad_ratio"]["fc1"], rel=1e-2)


# ---------------------------------------------------------------------------
# 5. Out-of-memory halving


class OOMNet(nn.Module):
    """Raises an out-of-memory error in the probe when the batch is larger than ``limit``.

    The error comes from a forward hook on ``where`` and only for real tensors that
    need gradients, so every tracer (proxies, fake tensors, no_grad runs) gets through.
    On ``fc1`` it raises before dropout draws random numbers (so a brute force can
    replay the masks); on ``fc2`` after BatchNorm and dropout have changed the state.
    """

    def __init__(self, limit: int, error: Callable[[], BaseException], where: str) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(3)  # on (batch, 3, 16): still trains with a batch of 1
        self.drop = nn.Dropout(0.25)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)
        self.limit = limit
        self.error = error
        getattr(self, where).register_forward_hook(self._oom)

    def _oom(self, module: nn.Module, args: Any, out: Any) -> None:
        if (isinstance(out, torch.Tensor) and not isinstance(out, FakeTensor)
                and out.requires_grad and out.shape[0] > self.limit):
            raise self.error()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.drop(self.bn(self.fc1(x)))))


OOM_ERRORS = {
    "OutOfMemoryError": lambda: OOM_ERROR("CUDA out of memory. Tried to allocate 20.00 GiB"),
    "RuntimeError": lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB "
                                         "(GPU 0; 79.10 GiB total capacity)"),
}


@pytest.mark.parametrize("error", list(OOM_ERRORS))
def test_oom_halves_the_batch(error: str) -> None:
    model, x = OOMNet(4, OOM_ERRORS[error], "fc1"), _randn(16, 3, 8, seed=23)
    model.eval()
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES)
    halving = [n for n in report.notes if "out of memory" in n]
    assert any("16" in n and "8" in n for n in halving), report.notes
    assert any(n.rstrip(".").endswith("4") for n in halving), report.notes
    assert report.probe.batches == BATCHES
    # The figures are those of the first 4 samples of each probe batch.
    batches = [tuple(t[:4] for t in b) for b in make_batches((x,), BATCHES, SEED)]
    expected = expected_figures(model, run_batches(model, batches))
    assert_matches(model, report, expected)
    assert not model.training


def test_oom_reports_the_original_batch_size_and_halves_once() -> None:
    model, x = OOMNet(4, OOM_ERRORS["OutOfMemoryError"], "fc1"), _randn(16, 3, 8, seed=23)
    report = gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES)
    assert report.probe.batch_size == 16
    halvings = [n for n in report.notes if "halved" in n]
    # 16 -> 8 -> 4 on the first batch; later batches start at the size that fit
    assert len(halvings) == 2, halvings


class Snapshot:
    """Parameters, buffers, .grad, requires_grad, train flags, hooks and the RNG state."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [(n, p, p.detach().clone(), p.requires_grad)
                       for n, p in model.named_parameters()]
        self.buffers = [(n, b, b.detach().clone()) for n, b in model.named_buffers()]
        self.grads = [(n, p.grad, None if p.grad is None else p.grad.detach().clone())
                      for n, p in model.named_parameters()]
        self.training = [(n, m.training) for n, m in model.named_modules()]
        self.hooks = self._hooks()
        self.rng = torch.get_rng_state()

    def _hooks(self) -> list[Any]:
        """Module hook dicts, global module hooks, and tensor hooks on parameters/buffers."""
        modules = [(n, attr, list(value.items())) for n, m in self.model.named_modules()
                   for attr, value in vars(m).items() if attr.endswith("hooks")
                   and isinstance(value, dict)]
        globals_ = [(attr, list(getattr(nn.modules.module, attr).items()))
                    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                 "_global_backward_hooks", "_global_backward_pre_hooks")]
        tensors = [(n, attr, list((getattr(t, attr, None) or {}).items()))
                   for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                   for attr in ("_backward_hooks", "_post_accumulate_grad_hooks")]
        return modules + globals_ + tensors

    def assert_unchanged(self) -> None:
        params = dict(self.model.named_parameters())
        assert list(params) == [n for n, *_ in self.params]
        for name, p, value, flag in self.params:
            assert params[name] is p, name
            assert p.dtype == value.dtype and p.device == value.device, name
            assert torch.equal(p.detach(), value), f"parameter {name} changed"
            assert p.requires_grad == flag, name
        buffers = dict(self.model.named_buffers())
        assert list(buffers) == [n for n, *_ in self.buffers]
        for name, b, value in self.buffers:
            assert buffers[name] is b, name
            assert b.dtype == value.dtype and torch.equal(b, value), f"buffer {name} changed"
        for name, grad, value in self.grads:
            assert params[name].grad is grad, f".grad of {name} replaced"
            if value is not None:
                assert torch.equal(grad, value), f".grad of {name} changed"
        assert [(n, m.training) for n, m in self.model.named_modules()] == self.training
        assert self._hooks() == self.hooks, "hooks added or removed"
        assert torch.equal(torch.get_rng_state(), self.rng), "torch RNG state changed"


@pytest.mark.parametrize("error", list(OOM_ERRORS))
def test_oom_even_with_a_batch_of_one(error: str) -> None:
    model, x = OOMNet(0, OOM_ERRORS[error], "fc2"), _randn(16, 3, 8, seed=23)
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    model.fc2.bias.requires_grad_(False)
    model.eval()
    model.drop.train()
    torch.manual_seed(77)
    snap = Snapshot(model)
    with pytest.raises(ModelRunError, match="out of memory even with a batch of 1"):
        gradscope.analyze(model, x, device="cpu", seed=SEED, batches=BATCHES)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# 6. Determinism


def test_two_runs_give_identical_reports_and_leave_the_rng_alone() -> None:
    model, x = EvalNet(), _randn(10, 8, seed=22)  # dropout: the probe draws random numbers
    torch.manual_seed(4321)
    state = torch.get_rng_state()
    first = gradscope.analyze(model, x, device="cpu", seed=3, lr=0.1, optimizer="adamw",
                              weight_decay=0.01).to_dict()
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # a different global RNG state before the second run
    state = torch.get_rng_state()
    second = gradscope.analyze(model, x, device="cpu", seed=3, lr=0.1, optimizer="adamw",
                               weight_decay=0.01).to_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    # Another seed gives other batches, so other numbers.
    other = gradscope.analyze(model, x, device="cpu", seed=4).to_dict()
    assert [layer["probe_grad_rms"] for layer in other["layers"]] != \
        [layer["probe_grad_rms"] for layer in first["layers"]]


# ---------------------------------------------------------------------------
# 7. The state guarantee on generated models

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class Block(nn.Module):
    def __init__(self, layer: nn.Module, norm: nn.Module | None, act: nn.Module,
                 drop: nn.Module | None, residual: bool) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.act = act
        self.drop = drop
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.norm is not None:
            h = self.norm(h)
        h = self.act(h)
        if self.drop is not None:
            h = self.drop(h)
        return x + h if self.residual else h


@st.composite
def generated_models(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, int]:
    conv = draw(st.booleans())
    depth = draw(st.integers(1, 4))
    batch = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    length = 6
    width = draw(st.sampled_from([3, 5]))
    blocks: list[nn.Module] = []
    for _ in range(depth):
        out = draw(st.sampled_from([width, 4]))
        layer: nn.Module = nn.Conv1d(width, out, 3, padding=1) if conv else nn.Linear(width, out)
        norm_kind = draw(st.sampled_from(["none", "batchnorm", "layernorm"]))
        norm: nn.Module | None = None
        if norm_kind == "batchnorm":
            norm = nn.BatchNorm1d(out)
            with torch.no_grad():
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
        elif norm_kind == "layernorm":
            norm = nn.LayerNorm([out, length] if conv else out)
        act = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]()
        drop = nn.Dropout(0.3) if draw(st.booleans()) else None
        residual = out == width and draw(st.booleans())
        blocks.append(Block(layer, norm, act, drop, residual))
        width = out
    model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(width * (length if conv else 1), 2))
    shape = (batch, blocks[0].layer.in_channels, length) if conv else \
        (batch, blocks[0].layer.in_features)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, seed


def _disturb(model: nn.Module, seed: int) -> None:
    """Non-default state: some grads, a frozen parameter, mixed train flags, a user hook."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn(p.shape, generator=g)
    if len(params) > 2:
        params[1].requires_grad_(False)
    model.train()
    for i, (_, m) in enumerate(model.named_modules()):
        if i % 3 == 2:
            m.eval()
    model.register_forward_hook(lambda m, a, o: None)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated_models(), st.sampled_from(["train", "eval"]))
def test_generated_models_are_left_untouched(case: tuple[nn.Module, torch.Tensor, int],
                                             mode: str) -> None:
    model, x, seed = case
    _disturb(model, seed)
    torch.manual_seed(seed + 2)
    snap = Snapshot(model)
    report = gradscope.analyze(model, x, device="cpu", batches=BATCHES, probe_mode=mode,
                               lr=1e-3, optimizer="adam")
    snap.assert_unchanged()
    assert report.probe.enabled and report.probe.batches == BATCHES
    doc = report.to_dict()
    validate_report(doc)
    assert any(layer["probe_grad_rms"] is not None for layer in doc["layers"])

