"""A short learning-rate range test: the given rate and factors of it, trained for real.

A factor computed from the first update's size rescued 3 of 24 failing training runs
and worsened 22 of 36 that trained (issue 14), so learning-rate advice comes from a
measured run instead (Smith 2017, "Cyclical Learning Rates"; fastai's ``lr_find``):
a copy of the model is trained for a few dozen steps of the user's optimiser on the
user's loss and real batches, from the same initial weights, batch order and seed, at
``lr`` and, only when that rate visibly fails, at factors of it in :data:`FACTORS`.

Advice follows only what that run showed. A range test is short-sighted: the rate
that lowers the loss fastest in 30 steps often diverges by step 300. So the rate
advised is the largest factor that trained *and* whose next larger factor in the grid
trained as well (a margin of one grid step, about x3), never the steepest; and nothing
is advised when the given rate trained. The user's model is never touched: every run
is on a deep copy, under a forked RNG.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.outputs import select_output
from gradscope.resources import Deadline
from gradscope.tracing.graph import to_device
from gradscope.tracing.runtime import is_float_tensor

#: Factors of the given learning rate tried, ascending; all within [1/100, 100] so that
#: no advice leaves [lr / 100, lr * 100] (issue 14). Half-decade steps: a margin of one
#: step is about x3.
FACTORS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Smallest and largest factor any advice may carry.
FACTOR_RANGE = (0.01, 100.0)
#: Default number of optimiser steps per factor.
DEFAULT_STEPS = 30
#: A run "trained" when its loss fell by at least this share of the starting loss ...
TRAINED_DROP = 0.10
#: ... "did not decrease" when it moved by less than this share either way, and
#: "rose" (diverged) when it rose by more.
FLAT_DROP = 0.02
#: A run whose loss went higher than the start by this share of it on some step is on
#: the edge of stability: it does not count as trained, whatever its end.
SPIKE = 1.0
#: Steps averaged for the smoothed first and last loss of a curve.
FIRST_STEPS, LAST_STEPS = 3, 5

#: A loss over real batches: ``loss(output, inputs, target)`` when batches carry targets,
#: else ``loss(output, inputs)``.
Loss = Callable[..., torch.Tensor]
#: One real batch: the model's positional inputs and the target (None: the loss needs none).
Batch = tuple[tuple[Any, ...], Any]


@dataclass(frozen=True)
class RangeRun:
    """One factor's short training run (no torch: the rules and the report read it)."""

    factor: float
    lr: float
    #: Mean loss over the batches at the initial weights (the same for every factor).
    start: float
    #: Mean loss over the same batches after the run; nan when the run went non-finite.
    end: float
    #: Smoothed curve: mean of the first and of the last few steps' losses.
    first: float
    last: float
    #: The highest step loss, to tell a run that spiked on its way down.
    peak: float
    steps: int
    #: The step at which the loss went non-finite, None if it never did.
    nonfinite_step: int | None
    losses: tuple[float, ...] = ()

    @property
    def drop(self) -> float:
        """Share of the starting loss the run removed (negative: it rose); nan if non-finite."""
        if self.nonfinite_step is not None or not math.isfinite(self.end):
            return math.nan
        return (self.start - self.end) / max(abs(self.start), 1e-12)

    @property
    def status(self) -> str:
        """``diverged`` (non-finite, or rose, or spiked), ``flat``, ``slow`` or ``trained``."""
        drop = self.drop
        # A rise within FLAT_DROP is "flat", not "diverged": dropout and batch noise move
        # a loss that a too-small rate leaves where it was by that much either way.
        if math.isnan(drop) or drop < -FLAT_DROP \
                or self.peak - self.start > SPIKE * abs(self.start):
            return "diverged"
        if abs(drop) < FLAT_DROP:
            return "flat"
        return "trained" if drop >= TRAINED_DROP else "slow"

    def describe(self) -> str:
        """``x0.1 (lr 0.01): 2.30 -> 0.41`` or ``x10 (lr 1): non-finite at step 4``."""
        return f"x{self.factor:g} (lr {self.lr:.3g}): {self.outcome()}"

    def outcome(self) -> str:
        """``2.30 -> 0.41``, ``non-finite at step 4`` or ``2.30 -> 2.31, peak 9.8 on the way``."""
        if self.nonfinite_step is not None:
            return f"non-finite at step {self.nonfinite_step}"
        text = f"{self.start:.4g} -> {self.end:.4g}"
        if self.peak - self.start > SPIKE * abs(self.start):
            text += f", peak {self.peak:.4g} on the way"
        return text


@dataclass(frozen=True)
class RangeTest:
    """The range test's runs, and the factor it supports (None: no advice)."""

    lr: float
    optimizer: str
    steps: int
    batches: int
    #: Runs in ascending factor order (only those run: the given rate first decides).
    runs: tuple[RangeRun, ...] = ()
    #: The factor the runs support, None when the given rate trained or none did.
    factor: float | None = None
    notes: tuple[str, ...] = field(default=())

    def run(self, factor: float) -> RangeRun | None:
        for r in self.runs:
            if r.factor == factor:
                return r
        return None

    @property
    def given(self) -> RangeRun | None:
        return self.run(1.0)

    @property
    def given_fails(self) -> bool:
        """The given rate visibly failed: non-finite, rising, or no decrease of the loss."""
        given = self.given
        return given is not None and given.status in ("diverged", "flat")

    @property
    def advised_lr(self) -> float | None:
        return None if self.factor is None else clamp_lr(self.lr * self.factor, self.lr)

    def summary(self) -> str:
        """One line with every run's figures, for the report's notes and findings."""
        return "; ".join(r.describe() for r in self.runs)


def clamp_lr(lr: float, given: float) -> float:
    """``lr`` inside [given / 100, given * 100]: advice never leaves that range."""
    lo, hi = FACTOR_RANGE
    return min(max(lr, given * lo), given * hi)


def choose_factor(runs: Sequence[RangeRun]) -> float | None:
    """The factor to advise, from runs over a grid; None when the given rate is fine.

    Advice only where the given rate (factor 1) visibly failed (diverged, rose, or
    the loss did not decrease) and another factor trained: the largest factor that
    trained whose next larger factor in the grid trained too (a margin against the
    short horizon), never factor 1 itself.
    """
    by_factor = {r.factor: r for r in runs}
    given = by_factor.get(1.0)
    if given is None or given.status not in ("diverged", "flat"):
        return None
    grid = sorted(by_factor)
    picks = []
    for i, f in enumerate(grid[:-1]):
        upper = by_factor[grid[i + 1]]
        if f != 1.0 and by_factor[f].status == "trained" and upper.status == "trained":
            picks.append(f)
    return max(picks) if picks else None


def output_picker(key: str | None) -> Callable[[Any], Any]:
    """The tensor the loss reads from the model's output: the probe's output entry."""
    def pick(out: Any) -> Any:
        return select_output(out, key, is_float_tensor)[0]

    return pick


def _make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class _Expired(Exception):
    """``--timeout`` passed during a run: the test stops and advises nothing."""


def _loss_of(model: nn.Module, batch: Batch, loss: Loss, output: Callable[[Any], Any]
             ) -> torch.Tensor:
    inputs, target = batch
    out = output(model(*inputs))
    value = loss(out, inputs) if target is None else loss(out, inputs, target)
    return value.reshape(())


def _mean_loss(model: nn.Module, batches: Sequence[Batch], loss: Loss,
               output: Callable[[Any], Any], seed: int) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        values = [float(_loss_of(model, b, loss, output)) for b in batches]
    return sum(values) / len(values)


def _one_run(initial: nn.Module, factor: float, lr: float, batches: Sequence[Batch],
             loss: Loss, output: Callable[[Any], Any], start: float, steps: int,
             optimizer: str, momentum: float, weight_decay: float, seed: int,
             deadline: Deadline | None) -> RangeRun:
    model = copy.deepcopy(initial)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(params, optimizer, lr * factor, momentum, weight_decay)
    torch.manual_seed(seed)
    losses: list[float] = []
    nonfinite: int | None = None
    for step in range(steps):
        if deadline is not None and deadline.expired():
            raise _Expired
        opt.zero_grad(set_to_none=True)
        value = _loss_of(model, batches[step % len(batches)], loss, output)
        number = float(value.detach())
        losses.append(number)
        if not math.isfinite(number):
            nonfinite = step
            break
        value.backward()
        opt.step()
    end = math.nan if nonfinite is not None else _mean_loss(model, batches, loss, output, seed)
    if not math.isfinite(end) and nonfinite is None:
        nonfinite = len(losses)
    finite = [v for v in losses if math.isfinite(v)]
    first = sum(finite[:FIRST_STEPS]) / max(len(finite[:FIRST_STEPS]), 1)
    last = sum(finite[-LAST_STEPS:]) / max(len(finite[-LAST_STEPS:]), 1)
    return RangeRun(factor=factor, lr=lr * factor, start=start, end=end, first=first,
                    last=last, peak=max([start, *finite]), steps=len(losses),
                    nonfinite_step=nonfinite, losses=tuple(losses))


def run_range_test(model: nn.Module, batches: Sequence[Batch], loss: Loss, lr: float,
                   optimizer: str = "sgd", *, momentum: float = 0.0,
                   weight_decay: float = 0.0, steps: int = DEFAULT_STEPS,
                   device: str | torch.device = "cpu", seed: int = 0, mode: str = "train",
                   output: Callable[[Any], Any] | None = None,
                   deadline: Deadline | None = None,
                   factors: Sequence[float] = FACTORS) -> RangeTest:
    """Train copies of ``model`` for ``steps`` steps at ``lr`` and, if it fails, at factors.

    Every run starts from the same weights (a deep copy of ``model`` as given), the
    same seed and the same batch order (``batches`` cycled); ``model`` itself and the
    global RNG states are left as they were. The given rate runs first: when it trains
    (or trains slowly) nothing else runs, since no advice will follow. When it did not
    move the loss, the factors above it run from the smallest up, until one diverges.
    When it diverged, or nothing above it gave a choice (and the next larger rate did
    not lower the loss further: then the rate is too small and smaller ones cannot
    train), the factors below it run from the largest down until two neighbours
    trained (nothing smaller could be chosen then). Above a diverging rate nothing is
    tried: larger rates do not train better.

    ``output`` picks the tensor the loss reads from the model's output (the probe's
    output entry). The loss is ``loss(output, inputs, target)`` for batches whose target
    is not None, else ``loss(output, inputs)``.
    """
    if not batches:
        raise ValueError("the range test needs at least one batch")
    output = output or output_picker(None)
    grid = sorted({float(f) for f in factors if FACTOR_RANGE[0] <= f <= FACTOR_RANGE[1]}
                  | {1.0})
    moved = [(to_device(inputs, device), to_device(target, device))
             for inputs, target in batches]
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    notes: list[str] = []
    runs: dict[float, RangeRun] = {}
    with torch.random.fork_rng(devices=devices):
        initial = copy.deepcopy(model)
        initial.train(mode != "eval")
        for p in initial.parameters():
            p.grad = None
        start = _mean_loss(initial, moved, loss, output, seed)

        def run(f: float) -> RangeRun:
            runs[f] = _one_run(initial, f, lr, moved, loss, output, start, steps, optimizer,
                               momentum, weight_decay, seed, deadline)
            return runs[f]

        try:
            given = run(1.0)
            if given.status == "flat":  # too small a rate, most likely: look above first
                for f in (f for f in grid if f > 1.0):
                    if run(f).status == "diverged":
                        break
            above = runs.get(min((f for f in grid if f > 1.0), default=1.0))
            # A flat rate whose next larger one lowered the loss further is too small:
            # smaller rates will not train either, and are not worth their runs.
            too_small = given.status == "flat" and above is not None and above is not given \
                and math.isfinite(above.end) and above.end < given.end
            if given.status in ("diverged", "flat") and not too_small \
                    and choose_factor(list(runs.values())) is None:
                previous = given
                for f in sorted((f for f in grid if f < 1.0), reverse=True):
                    current = run(f)
                    if current.status == "trained" and previous.status == "trained":
                        break  # the largest pair below: nothing smaller can be chosen
                    previous = current
        except _Expired:
            notes.append("the learning-rate range test stopped at --timeout: no advice from it")
            return RangeTest(lr=lr, optimizer=optimizer, steps=steps, batches=len(batches),
                             runs=tuple(runs[f] for f in sorted(runs)), factor=None,
                             notes=tuple(notes))
    ordered = tuple(runs[f] for f in sorted(runs))
    return RangeTest(lr=lr, optimizer=optimizer, steps=steps, batches=len(batches),
                     runs=ordered, factor=choose_factor(ordered), notes=tuple(notes))
