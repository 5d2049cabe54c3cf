"""What the optimizer the user trains with can and cannot fix: one place for the rules.

Plain SGD steps by lr x g, so a layer whose gradient is 1e-4 of the others' moves 1e-4 as
fast and an exploding gradient makes an exploding step: the vanishing and exploding
verdicts are about SGD. Adam and AdamW divide each element's step by sqrt(v) + eps, the
running RMS of that element's gradient: a uniformly small or large gradient gives an
lr-sized step all the same (Kingma & Ba 2015, sec. 2.1: the step is bounded by about lr,
whatever the gradient's scale). What Adam cannot rescale is a gradient at or below its
eps (1e-8 in PyTorch): there the step is g / eps x lr, as small as SGD's. In issue 14's
trainability experiment, deep stacks whose first layers' gradient RMS per element was
2.5e-8 or more trained under Adam, those at 1e-10 to 7e-10 did not (docs/trainability.md).

Without ``--optimizer`` the verdict assumes plain SGD, the optimizer that rescales nothing,
and the report says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

#: The usual band of first-update/weight ratios, around 1e-3 (CS231n, "ratio of
#: weights:updates"): below 1e-4 a layer barely moves, above 1e-2 it is rewritten in a few
#: steps. GS601/GS602 report against it; under SGD the vanishing verdict reads its floor.
UPDATE_RATIO_BAND = (1e-4, 1e-2)
UPDATE_RATIO_TARGET = 1e-3
#: PyTorch's default eps of torch.optim.Adam / AdamW.
ADAM_EPS = 1e-8
ADAPTIVE = ("adam", "adamw")
#: The report's note when no optimizer was given.
ASSUMED_NOTE = ("the verdict assumes plain SGD (no --optimizer given): under adam/adamw, "
                "uniformly small or large gradients are rescaled and judged against Adam's "
                "eps instead; give --optimizer to judge for the one you train with")


def adaptive(analysis: Analysis) -> bool:
    """Whether the user trains with an optimizer that rescales each element's step."""
    return analysis.optimizer in ADAPTIVE


def gradient_scale(analysis: Analysis, nodes: Iterable[str]) -> tuple[str, float] | None:
    """The smallest measured weight-gradient RMS per element among ``nodes``, with its node."""
    probe = analysis.probe
    if probe is None:
        return None
    found: list[tuple[float, str]] = []
    for n in nodes:
        rms = probe.param_grad_rms.get(n)
        if rms is not None:
            found.append((rms, n))
    if not found:
        return None
    smallest, node = min(found)
    return node, smallest


def scale_words(analysis: Analysis) -> str:
    """How the absolute gradient scale was obtained (the user's loss, or a rescaled one)."""
    probe = analysis.probe
    return probe.grad_scale if probe is not None and probe.grad_scale else "the probe's loss"
