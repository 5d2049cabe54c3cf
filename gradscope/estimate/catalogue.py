"""The op catalogue: every op family's rules, loaded, and how a node's key finds its rule.

Importing the ``ops_*`` modules is what registers their rules (``ops_base.rule``),
so whoever asks whether a key is understood, or which rule applies, asks here,
where the catalogue is known to be complete. Activations are matched by the
``activation:`` prefix of their key rather than registered one by one: every
name ``gradscope.tracing.ops`` canonicalises has moments in
``gradscope.estimate.activations``. Any other key passes the signal through
with gain 1 and counts as not understood (``docs/static-estimate.md``).
"""

from __future__ import annotations

from gradscope.estimate import (  # noqa: F401  (imported to register their rules)
    ops_arith,
    ops_attention,
    ops_dense,
    ops_norm,
    ops_recurrent,
    ops_reduce,
    ops_routing,
)
from gradscope.estimate.ops_activation import ActivationRule
from gradscope.estimate.ops_base import (
    BACKWARD,
    FORWARD,
    Backward,
    Forward,
    pass_backward,
    pass_forward,
)


#: Keys the estimator models; anything else is "unknown" (gain 1, not understood).
def understands(key: str) -> bool:
    if key.startswith("activation:"):
        return True
    return key in FORWARD


def forward_rule(key: str) -> Forward:
    """The forward rule of a key (the pass-through for keys not understood)."""
    return FORWARD.get(key, ActivationRule.forward if key.startswith("activation:")
                       else pass_forward)


def backward_rule(key: str) -> Backward:
    """The backward rule of a key (gain 1 to every input for keys not understood)."""
    return BACKWARD.get(key, ActivationRule.backward if key.startswith("activation:")
                        else pass_backward)
