"""Verifying a watched run's advice by training copies of it (``gradscope.watch(replay=...)``).

A fix of a training run (a lower learning rate, gradient clipping, a warmup) is offered
only where it was tried: the model as it was when the watch started is copied, the same
optimizer class with the same settings is built for the copy, and the watched steps are
trained again with the change, each step's loss computed by the user's ``replay(model,
step)`` (their batches and their loss, so the copy sees what the run saw). The change is
offered when it ends the watched steps finite and with a lower loss than the run itself:
the figure it is offered with is that measurement (``Recommendation.measured``).

Loop changes only: model changes (an activation, a normalisation) are what the
before-training analysis verifies and ``gradscope.fixes.apply`` makes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gradscope.records import Finding, Recommendation, Verification
from gradscope.steps import TrainingRecord, start_norm

#: ``replay(model, step)``: the loss of watched step ``step`` computed on ``model``.
Replay = Callable[[nn.Module, int], torch.Tensor]
#: Builds a watch (``gradscope.watching.Watch``) for a copy's run: a context manager with
#: ``loss()`` and ``record``.
Watcher = Callable[..., Any]

#: The codes whose cause is the step size: a change of the loop is the fix to try.
STEP_SIZE_CODES = ("GS105", "GS203", "GS403", "GS503", "GS604", "GS605")
#: How the watched steps end, the figure a change is judged on: the mean of the last losses.
TAIL = 5
#: A change is offered when it lowers that figure by at least this share (or makes a
#: non-finite run finite): a smaller difference is within one run's batch-to-batch noise.
MIN_GAIN = 0.05


@dataclass(frozen=True)
class Change:
    """One change of the training loop, as a report's recommendation describes it."""

    kind: str
    text: str
    action: dict[str, float | int | str]
    lr_factor: float = 1.0
    clip: float | None = None
    warmup: int = 0
    warmup_start: float = 0.1


def candidates(record: TrainingRecord) -> list[Change]:
    """The loop changes worth trying on this run, with their numbers."""
    out = []
    lr = record.lr
    if lr is not None and lr > 0:
        out.append(Change("learning_rate", f"lower the learning rate to {lr / 10:.3g} (from "
                          f"{lr:.3g})", {"op": "learning_rate", "lr": lr / 10},
                          lr_factor=0.1))
    clip = start_norm(record)
    if clip is not None and clip > 0:
        out.append(Change("gradient_clipping", f"clip the gradient norm at {clip:.3g} (the "
                          "median of the first five steps' norms): "
                          f"torch.nn.utils.clip_grad_norm_(model.parameters(), {clip:.3g})",
                          {"op": "clip_grad_norm", "max_norm": clip}, clip=clip))
    steps = max(record.steps // 2, 1)
    out.append(Change("warmup", f"warm the learning rate up over the first {steps} steps "
                      "from 0.1x (LinearLR(optimizer, start_factor=0.1, "
                      f"total_iters={steps}))",
                      {"op": "warmup", "steps": steps, "start_factor": 0.1}, warmup=steps))
    return out


def _tail(losses: Sequence[float | None]) -> float:
    """The mean of the last ``TAIL`` losses, inf when the run went non-finite."""
    values = [v for v in losses if v is not None]
    if not values or any(not math.isfinite(v) for v in values):
        return math.inf
    last = values[-TAIL:]
    return sum(last) / len(last)


def train_copy(model: nn.Module, initial: nn.Module, optimizer: torch.optim.Optimizer,
               replay: Replay, steps: int, change: Change, watcher: Watcher, every: int = 10,
               ) -> tuple[list[float], list[Finding]]:
    """The watched steps trained again on a copy of ``initial`` with ``change``, watched the
    same way (``watcher``: ``gradscope.watching.Watch``, which calls this module and so is
    handed in): the copy's losses, and the warnings and errors of the rules over its steps."""
    from gradscope.rules.steps import run_step_rules

    trained = copy.deepcopy(initial)
    trained.train(model.training)
    params = list(trained.parameters())
    # The optimizer holds the run's own parameters: the copy's are found by position.
    index = {id(p): i for i, p in enumerate(model.parameters())}
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [params[index[id(p)]] for p in group["params"]
                                              if id(p) in index]})
    if not any(g["params"] for g in groups):
        raise ValueError("the optimizer steps none of the model's parameters")
    opt = type(optimizer)(groups, **optimizer.defaults)
    base = [float(g["lr"]) * change.lr_factor for g in opt.param_groups]
    losses: list[float] = []
    with watcher(trained, opt, every=every, horizon=steps) as watch:
        for step in range(steps):
            share = (change.warmup_start + (1 - change.warmup_start) * step / change.warmup
                     if step < change.warmup else 1.0)
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * share
            loss = replay(trained, step)
            watch.loss(loss)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if change.clip is not None:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), change.clip)
            opt.step()
    flagged = [f for f in run_step_rules(watch.record) if f.severity in ("error", "warning")]
    return losses, flagged


def verified_findings(findings: Sequence[Finding], record: TrainingRecord, model: nn.Module,
                      initial: nn.Module, optimizer: torch.optim.Optimizer, replay: Replay,
                      watcher: Watcher) -> list[Finding]:
    """``findings`` with the loop changes that trained better attached to the step-size ones.

    Each change is trained once and shared by every finding it answers; the run's own
    watched losses are the baseline.
    """
    wanted = [f for f in findings if f.rule in STEP_SIZE_CODES]
    steps = len(record.losses)
    if not wanted or steps < 2 * TAIL:
        return list(findings)
    before = _tail(record.losses)
    offered: list[Recommendation] = []
    for change in candidates(record):
        losses, flagged = train_copy(model, initial, optimizer, replay, steps, change,
                                     watcher, record.every)
        after = _tail(losses)
        if not flagged and math.isfinite(after) and (not math.isfinite(before)
                                                     or after <= (1 - MIN_GAIN) * before):
            offered.append(Recommendation(
                kind=change.kind, text=change.text, action=dict(change.action),
                measured=Verification(
                    metric=f"mean loss over the last {TAIL} of {steps} watched steps, "
                    "trained again on a copy", before=before, after=after)))
    offered.sort(key=lambda r: r.measured.after if r.measured else math.inf)
    return [replace(f, recommendations=(*f.recommendations, *offered))
            if f.rule in STEP_SIZE_CODES and offered else f for f in findings]
