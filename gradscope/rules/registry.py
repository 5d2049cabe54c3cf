"""The one registry of rule codes: summary, what/why/fix text and references.

Codes are grouped by hundreds per family and never reused:
GS1xx vanishing gradients, GS2xx exploding gradients, GS3xx saturation,
GS4xx dead units, GS5xx non-finite values, GS6xx learning rate,
GS7xx architecture, GS8xx tracing. This module imports no torch, so
``gradscope rules`` and the renderers stay light.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gradscope.report import Severity

FAMILIES: dict[int, str] = {
    1: "vanishing_gradient",
    2: "exploding_gradient",
    3: "saturation",
    4: "dead_units",
    5: "nonfinite",
    6: "learning_rate",
    7: "architecture",
    8: "trace",
}


@dataclass(frozen=True)
class Rule:
    """Everything a user needs to understand a code without reading gradscope's source."""

    code: str
    name: str
    category: str
    severity: Severity
    summary: str
    what: str
    why: str
    fix: str
    references: tuple[str, ...] = ()

    def explain(self) -> str:
        """The long text of ``gradscope rules CODE``."""
        refs = "\n".join(f"  - {r}" for r in self.references) or "  (none)"
        return (
            f"{self.code} {self.name} [{self.category}, default severity {self.severity}]\n"
            f"{self.summary}\n\n"
            f"What: {self.what}\n\nWhy: {self.why}\n\nHow to fix: {self.fix}\n\n"
            f"References:\n{refs}\n"
        )


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add a rule; a duplicate code or a code outside its family is a programming error."""
    if rule.code in RULES:
        raise ValueError(f"duplicate rule code {rule.code}")
    family = int(rule.code[2])
    if FAMILIES.get(family) != rule.category:
        raise ValueError(f"{rule.code} is in family {family} but has category {rule.category}")
    RULES[rule.code] = rule
    return rule


def iter_rules() -> Iterator[Rule]:
    """Rules in code order, for listings and SARIF."""
    for code in sorted(RULES):
        yield RULES[code]


def get_rule(code: str) -> Rule:
    try:
        return RULES[code.upper()]
    except KeyError:
        raise KeyError(code) from None


_SCHOENHOLZ = "Schoenholz et al. 2017, Deep Information Propagation (ICLR)"
_GLOROT = "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward networks"
_HE = "He et al. 2015, Delving Deep into Rectifiers (ICCV)"
_HE_RES = "He et al. 2016, Deep Residual Learning for Image Recognition (CVPR)"
_PASCANU = "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks"

register(
    Rule(
        code="GS101",
        name="vanishing-gradient-predicted",
        category="vanishing_gradient",
        severity="error",
        summary="The static estimate predicts the gradient shrinks by orders of magnitude "
        "before it reaches the first layers.",
        what="From the weights' measured scales and the activations' derivative moments, "
        "the backward signal reaching the earliest trainable layers is predicted to be a "
        "small fraction of the signal at the output, after discounting pooling, averaging "
        "and width changes, which rescale the gradient without starving any layer.",
        why="Layers that receive almost no gradient barely move: the early layers stay at "
        "their initialisation while the late layers fit the data alone. The product of "
        "per-layer gains chi over a plain stack of depth L behaves as chi^L.",
        fix="Initialise for the activation (Kaiming fan_in for ReLU, the critical sigma_w "
        "for tanh), swap saturating activations (sigmoid) for ReLU-like ones, add residual "
        "connections around the long plain stack, or put normalisation in it.",
        references=(_SCHOENHOLZ, _GLOROT, _HE),
    )
)
register(
    Rule(
        code="GS102",
        name="vanishing-gradient-measured",
        category="vanishing_gradient",
        severity="error",
        summary="The probe measured the gradient shrinking by orders of magnitude towards "
        "the first layers.",
        what="A real forward and backward pass on the target device measured the RMS of "
        "dLoss/d(activation) at every node; at the earliest trainable layers it is a small "
        "fraction of the RMS at the output, after discounting pooling, averaging and width "
        "changes.",
        why="Measured, not predicted: whatever the cause (initialisation, saturation, dead "
        "units), the early layers get too little gradient to learn.",
        fix="See the estimate's explanation of where the signal is lost; fix the "
        "initialisation or activation there, or add a residual connection around it.",
        references=(_GLOROT, _HE, _HE_RES),
    )
)
register(
    Rule(
        code="GS103",
        name="vanishing-through-time",
        category="vanishing_gradient",
        severity="error",
        summary="A recurrent layer is predicted to lose the gradient over its unroll: early "
        "time steps get almost none.",
        what="The static estimate unrolls nn.LSTM/GRU/RNN over the sequence with the actual "
        "gate weights and biases; the gradient's squared norm shrinks by the step gain chi "
        "per step back in time, so the first step receives chi^(T-1) of what the last gets.",
        why="Long-range dependencies cannot be learned when their gradient is 1e-20 of the "
        "local one; LSTMs with PyTorch's default forget-gate bias 0 forget almost as fast as "
        "a vanilla RNN.",
        fix="For LSTMs set the forget-gate bias to 1 (3 or more for 100+ steps); for vanilla "
        "RNNs use an LSTM/GRU or an orthogonal recurrent matrix; shorten the unroll "
        "(truncated BPTT) if long memory is not needed.",
        references=(_PASCANU,
                    "Hochreiter & Schmidhuber 1997, Long Short-Term Memory",
                    "Jozefowicz, Zaremba & Sutskever 2015, An Empirical Exploration of "
                    "Recurrent Network Architectures"),
    )
)
register(
    Rule(
        code="GS201",
        name="exploding-gradient-predicted",
        category="exploding_gradient",
        severity="error",
        summary="The static estimate predicts the gradient grows by orders of magnitude "
        "towards the first layers.",
        what="The per-layer backward gains multiply to a large factor between the output "
        "and the earliest trainable layers.",
        why="Early layers then take steps far larger than late ones: training diverges or "
        "needs a learning rate so small that the rest of the network stalls.",
        fix="Reduce the initial weight scale (Kaiming fan_in for ReLU; for tanh stay at the "
        "critical sigma_w rather than above it), normalise, and clip the gradient norm "
        "while the cause is fixed.",
        references=(_SCHOENHOLZ, _PASCANU),
    )
)
register(
    Rule(
        code="GS202",
        name="exploding-gradient-measured",
        category="exploding_gradient",
        severity="error",
        summary="The probe measured the gradient growing by orders of magnitude towards the "
        "first layers.",
        what="The measured RMS of dLoss/d(activation) at the earliest trainable layers is "
        "many times the RMS at the output, after discounting pooling and width changes.",
        why="Exploding gradients make the first optimiser steps destroy the early layers; "
        "losses turn to NaN within a few steps.",
        fix="Clip the global gradient norm (threshold from the probe), lower the initial "
        "weight scale, and add normalisation.",
        references=(_PASCANU,),
    )
)
register(
    Rule(
        code="GS501",
        name="nonfinite-forward",
        category="nonfinite",
        severity="error",
        summary="NaN or Inf appeared in the forward pass.",
        what="A node of the graph produced NaN or infinite values on the probe inputs; the "
        "finding names the first such node in forward order.",
        why="Every gradient downstream of a non-finite activation is non-finite too: one "
        "optimiser step turns all weights into NaN.",
        fix="Guard the op (clamp before log/sqrt/division, add an epsilon), check the "
        "inputs' range, and lower the initial weight scale if activations overflow.",
        references=("Micikevicius et al. 2018, Mixed Precision Training (ICLR)",),
    )
)
register(
    Rule(
        code="GS502",
        name="nonfinite-backward",
        category="nonfinite",
        severity="error",
        summary="NaN or Inf appeared in the backward pass while the forward was finite.",
        what="The gradient at some node is non-finite although its forward value is finite; "
        "the finding names the node closest to the output where it starts.",
        why="Derivatives can overflow where values do not (sqrt at 0, pow with small bases, "
        "division by small numbers): the first step writes NaN into the weights.",
        fix="Add an epsilon inside sqrt/pow/division, clamp the operand, or clip the "
        "gradient norm.",
        references=(_PASCANU,),
    )
)
register(
    Rule(
        code="GS801",
        name="trace-fallback",
        category="trace",
        severity="info",
        summary="torch.fx symbolic tracing failed; a fallback tracer recorded the graph.",
        what="gradscope tries torch.fx.symbolic_trace, then torch.export.export, then a "
        "runtime graph recorded with module hooks during one forward. This model needed a "
        "fallback; the report says why each earlier tracer failed.",
        why="torch.export graphs are at the level of aten ops, so module paths come from "
        "nn_module_stack; a runtime graph records only the path the example inputs took "
        "through data-dependent branches, so other branches are not analysed.",
        fix="Nothing is required. For a fully symbolic graph, move data-dependent control "
        "flow out of forward or mark the offending submodule as a leaf.",
        references=("PyTorch docs: torch.fx limitations of symbolic tracing",),
    )
)
register(
    Rule(
        code="GS802",
        name="low-op-coverage",
        category="trace",
        severity="warning",
        summary="The static estimate understands fewer than 90% of the graph's operations.",
        what="Ops the estimator does not model pass the signal through with gain 1; the "
        "finding lists them. Below 90% coverage the static estimate is a rough guide only.",
        why="An unknown op may scale the gradient by any factor; the probe still measures "
        "it, the prediction cannot.",
        fix="Trust the probe's figures for these nodes; report the op names so gradscope "
        "can learn them.",
        references=(),
    )
)
register(
    Rule(
        code="GS601",
        name="learning-rate-scale",
        category="learning_rate",
        severity="warning",
        summary="With the given learning rate, the first update moves the weights by far "
        "more or far less than ~1e-3 of their norm.",
        what="The probe computed each layer's first optimiser step (SGD: lr * g; Adam/AdamW: "
        "lr * g / (|g| + eps), plus decoupled decay) without taking it, and compared its norm "
        "with the weight's. The median layer falls outside [1e-4, 1e-2].",
        why="An update/weight ratio around 1e-3 is the usual healthy range: far above it the "
        "first steps overwrite the initialisation (and diverge), far below it nothing learns.",
        fix="Scale the learning rate by the factor given (it brings the median ratio to 1e-3), "
        "and warm it up over the first few hundred to thousand steps.",
        references=("CS231n, Neural Networks Part 3: ratio of weights:updates",
                    "Kingma & Ba 2015, Adam: A Method for Stochastic Optimization"),
    )
)
