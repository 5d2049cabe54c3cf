"""The options of one analysis, declared once: thresholds the rules judge against.

No torch here: the settings layer (``gradscope.config``) and the command line read
these declarations before deciding whether torch is needed at all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """Limits on the gradient ratio (earliest trainable layers / output), after pooling.

    Ratios are of gradient norms, discounting averaging ops (see
    ``gradscope.estimate.propagate``). Defaults follow docs/static-estimate.md:
    a plain stack whose product of gains leaves [1e-2, 1e2] needs attention.
    """

    vanishing_warning: float = 1e-2
    vanishing_error: float = 1e-3
    exploding_warning: float = 1e2
    exploding_error: float = 1e3
    min_coverage: float = 0.9
    #: Share of an activation's outputs in the flat tails (GS301/GS302); half of it
    #: saturated is an error.
    saturated_fraction: float = 0.2
    #: Share of a layer's units dead on every probe sample (GS401); all dead is an error.
    dead_fraction: float = 0.5
    #: Bias mean before a ReLU, in pre-activation standard deviations (GS402).
    negative_bias: float = 0.5
    #: Smallest ||grad W||/||W|| over the median layer's (GS104).
    update_imbalance: float = 1e-3
    #: Weight layers on a path no skip bypasses (GS701/GS702).
    plain_depth: int = 10
    #: Residual blocks without normalisation or branch scale (GS704).
    residual_blocks: int = 4
    #: Hanin's beta = sum of 1/width over the plain run's hidden layers (GS706).
    width_beta: float = 1.0
