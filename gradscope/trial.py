"""Model changes tried for real: each fix with an action, trained briefly at the user's rate.

The rules verify every model change on the static estimate (the gradient ratio it
targets moves towards 1). That says the gradient will flow; it does not say the changed
model trains at the user's learning rate: in issue 14's trainability benchmark a
Kaiming re-initialisation that the estimate verified made a ReLU stack diverge under
SGD at 1.0, and a plain 50-layer stack it made "healthy" still failed at 0.1. So where
the range test ran (a learning rate, the user's loss and real batches), each model
change that :func:`gradscope.fixes.apply` can make is applied to a copy and trained for
the range test's steps at the given rate, from the same batches and seed as the range
test's run of the unchanged model:

- a change under which that run breaks (the loss non-finite, or ending above its start)
  while the unchanged model's did not, or ends above the unchanged model's, is withdrawn,
  with a note: on the user's data and rate it did harm (where both break, the rate is
  the problem: GS601 says so);
- the others carry the measurement (``Recommendation.measured``: the mean loss after the
  steps, unchanged model -> changed one), and within each finding the changes are
  ordered by the share of the loss they removed, most first: the first fix a user tries
  is the one the measurement supports most.

Nothing is tried without a range test: there is then no loss or data to train on.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from gradscope.fixes import MODEL_OPS, apply
from gradscope.lr_range import Batch, Loss, RangeRun, RangeTest, run_range_test
from gradscope.records import Finding, Recommendation, Verification
from gradscope.resources import Deadline


def _worse(run: RangeRun, baseline: RangeRun) -> str | None:
    """Why the changed model's run argues against the change, or None.

    It broke while the unchanged model's did not; or both ran and the change lowered the
    loss by a smaller share of where it started than no change did: on the user's data
    and rate it learnt less in the steps measured (an orthogonal recurrent matrix on a
    tanh character RNN that trained at SGD 1.0: 4.6 -> 3.18 against 4.6 -> 2.51, and 0.2
    nats worse after 300 steps). The share, not the end: a re-initialisation that starts
    from larger logits ends a short run higher while it learns far more (ReLU+Kaiming in
    place of a sigmoid stack: 3.5 -> 2.4 against a flat 2.30).
    """
    if _broke(run):
        return None if _broke(baseline) else "broke"
    if not _broke(baseline) and run.drop < baseline.drop:
        return "lowered the loss less than no change"
    return None


def _broke(run: RangeRun) -> bool:
    """Whether a short run broke: non-finite, or its loss ended above where it started.

    Not the range test's "diverged", which also counts a spike on the way down: that
    marks a rate on the edge of stability, but a change whose run spikes and ends far
    below the unchanged model's has not broken anything (a residual stack at SGD 0.1
    on digits: 3.8 -> 0.84 through a peak of 18.6, against 2.30 -> 2.29 without it).
    """
    return run.nonfinite_step is not None or not math.isfinite(run.end) or run.end > run.start


def _key(rec: Recommendation) -> str | None:
    if rec.action is None or rec.action.get("op") not in MODEL_OPS:
        return None
    return json.dumps(rec.action, sort_keys=True)


def try_fixes(model: nn.Module, findings: Sequence[Finding], test: RangeTest,
              batches: Sequence[Batch], loss: Loss, *, momentum: float,
              weight_decay: float, device: str, seed: int, mode: str,
              output: Callable[[Any], Any], deadline: Deadline | None,
              ) -> tuple[list[Finding], list[str]]:
    """The findings with each model change measured (or withdrawn), and notes on what was."""
    baseline = test.given
    if baseline is None:
        return list(findings), []
    runs: dict[str, RangeRun | str] = {}
    for finding in findings:
        for rec in finding.recommendations:
            key = _key(rec)
            if key is None or key in runs:
                continue
            if deadline is not None and deadline.expired():
                runs[key] = "not tried: --timeout reached"
                continue
            runs[key] = _try(model, rec, test, batches, loss, momentum=momentum,
                             weight_decay=weight_decay, device=device, seed=seed, mode=mode,
                             output=output)
    notes: list[str] = []
    withdrawn: set[str] = set()
    noted: set[str] = set()  # one note per change, however many findings offer it
    out: list[Finding] = []
    for finding in findings:
        kept: list[tuple[tuple[int, float, int], Recommendation]] = []
        for position, rec in enumerate(finding.recommendations):
            key = _key(rec)
            result = runs.get(key) if key is not None else None
            if not isinstance(result, RangeRun):
                if isinstance(result, str) and key not in noted:
                    noted.add(str(key))
                    notes.append(f"{rec.kind} fix ({rec.action and rec.action.get('op')}) "
                                 f"{result}")
                # Advice for the training loop, or a change made by hand: as it was.
                kept.append(((-1, 0.0, position), rec))
                continue
            why = _worse(result, baseline)
            if why is not None:
                if key not in withdrawn:
                    withdrawn.add(str(key))
                    notes.append(
                        f"{rec.kind} fix ({rec.action and rec.action.get('op')}) withdrawn: "
                        f"applied to a copy and trained {result.steps} steps at lr "
                        f"{test.lr:g} ({test.optimizer}) on your batches it {why} "
                        f"({result.outcome()}), where the unchanged model went "
                        f"{baseline.outcome()}")
                continue
            measured = Verification(
                f"mean loss over your batches after {test.steps} {test.optimizer} steps at lr "
                f"{test.lr:g} (measured, on a copy)", baseline.end, result.end)
            text = (f"{rec.text} Measured: {test.steps} steps at lr {test.lr:g} on your "
                    f"batches take the loss {result.outcome()} with the change, "
                    f"{baseline.outcome()} without.")
            kept.append(((1 if _broke(result) else 0, -result.drop, position),
                         replace(rec, text=text, measured=measured)))
        # Loop advice and hand edits come first, in their order; the measured changes
        # follow, ordered by what their runs showed.
        kept.sort(key=lambda item: item[0])
        out.append(replace(finding, recommendations=tuple(rec for _, rec in kept)))
    return out, notes


def _try(model: nn.Module, rec: Recommendation, test: RangeTest, batches: Sequence[Batch],
         loss: Loss, *, momentum: float, weight_decay: float, device: str, seed: int,
         mode: str, output: Callable[[Any], Any]) -> RangeRun | str:
    """The given rate's short run on a copy of ``model`` with ``rec`` applied."""
    try:
        changed = apply(copy.deepcopy(model), rec, seed=seed)
    except Exception as exc:  # noqa: BLE001 - a change that cannot be made is not tried
        return f"not tried: {type(exc).__name__}: {exc}"
    try:
        result = run_range_test(changed, batches, loss, test.lr, test.optimizer,
                                momentum=momentum, weight_decay=weight_decay, steps=test.steps,
                                device=device, seed=seed, mode=mode, output=output,
                                factors=(1.0,))
    except Exception as exc:  # noqa: BLE001 - the changed model could not train: say so
        return f"not tried: the changed model raised {type(exc).__name__}: {exc}"
    finally:
        del changed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result.given if result.given is not None else "not tried: no run at the given rate"
