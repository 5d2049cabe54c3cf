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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: the report model's dataclasses cost `gradscope rules`
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


#: Markers around the generated rule table in README.md.
TABLE_START = "<!-- rules:start (generated: gradscope rules --format markdown) -->"
TABLE_END = "<!-- rules:end -->"


def markdown_table() -> str:
    """The README's rule table, generated so it cannot drift from the registry."""
    lines = ["| code | name | severity | category | summary |", "|---|---|---|---|---|"]
    lines += [f"| {r.code} | {r.name} | {r.severity} | {r.category} | {r.summary} |"
              for r in iter_rules()]
    return "\n".join(lines) + "\n"


def markdown_reference() -> str:
    """docs/rules.md: every rule's what / why / fix and papers, generated like the table."""
    out = ["# Rules", "",
           "Generated from `gradscope/rules/registry.py` (`gradscope rules --format "
           "reference`); `gradscope rules CODE` prints the same text.", ""]
    for family, category in sorted(FAMILIES.items()):
        rules = [r for r in iter_rules() if r.category == category]
        if not rules:
            continue
        out += [f"## GS{family}xx: {category}", ""]
        for r in rules:
            out += [f"### {r.code} {r.name}", "",
                    f"Default severity **{r.severity}**. {r.summary}", "",
                    f"**What.** {r.what}", "", f"**Why.** {r.why}", "",
                    f"**How to fix.** {r.fix}", ""]
            if r.references:
                out += ["References:", "", *[f"- {ref}" for ref in r.references], ""]
    return "\n".join(out)


def replace_table(readme: str) -> str:
    """``readme`` with the text between the table markers regenerated."""
    head, found, rest = readme.partition(TABLE_START)
    _, found_end, tail = rest.partition(TABLE_END)
    if not found or not found_end:
        raise ValueError("README.md has no rule-table markers")
    return f"{head}{TABLE_START}\n{markdown_table()}{TABLE_END}{tail}"


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
        references=(_SCHOENHOLZ, "Reed et al. 2022, torch.fx: Practical Program Capture and "
                    "Transformation for Deep Learning in Python (MLSys)"),
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

_YANG = "Yang et al. 2019, A Mean Field Theory of Batch Normalization (ICLR)"
_XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (ICML)"
_HANIN = "Hanin 2018, Which Neural Net Architectures Give Rise to Exploding and Vanishing " \
    "Gradients? (NeurIPS)"
_DE_SMITH = "De & Smith 2020, Batch Normalization Biases Residual Blocks Towards the Identity " \
    "Function in Deep Networks (NeurIPS)"
_ZHANG_FIXUP = "Zhang, Dauphin & Ma 2019, Fixup Initialization: Residual Learning Without " \
    "Normalization (ICLR)"
_LU = "Lu et al. 2020, Dying ReLU and Initialization: Theory and Numerical Examples"
_BROCK = "Brock et al. 2021, High-Performance Large-Scale Image Recognition Without " \
    "Normalization (adaptive gradient clipping)"

register(
    Rule(
        code="GS104",
        name="update-imbalance-measured",
        category="vanishing_gradient",
        severity="warning",
        summary="Some layers' weight gradients are orders of magnitude smaller, relative to "
        "their weights, than the rest's: they will not train at the same learning rate.",
        what="For every trainable layer the probe measured ||grad W|| / ||W||, the relative "
        "step a plain SGD update takes. The smallest is far below the median layer's. "
        "Judged on the ratio, not on ||grad W|| alone: a layer with huge weights (or one "
        "followed by a normalisation) can show an ordinary gradient norm and still not move.",
        why="With one learning rate for all layers, a layer whose relative step is 1e-4 of the "
        "others' stays at its initialisation for the whole run.",
        fix="Rescale that layer's initialisation to match its neighbours' (a weight far larger "
        "than Kaiming's scale is the usual cause), or give it its own parameter group.",
        references=(_HE, "You et al. 2017, Large Batch Training of Convolutional Networks "
                    "(LARS: per-layer ||grad W|| / ||W||)"),
    )
)
register(
    Rule(
        code="GS301",
        name="saturation-predicted",
        category="saturation",
        severity="warning",
        summary="The static estimate predicts many sigmoid/tanh outputs in their flat tails.",
        what="From the pre-activation's predicted mean and variance, the share of units whose "
        "derivative is below 1% of its maximum (|z| > 2.99 for tanh, > 5.99 for sigmoid, "
        "outside the linear band of hardtanh) is large.",
        why="A saturated unit passes almost no gradient: its derivative is near 0, and it "
        "stays saturated because its inputs' weights get no gradient either.",
        fix="Shrink the weights feeding the activation (the critical sigma_w = 1 for tanh with "
        "zero bias), normalise its input, or use a non-saturating activation.",
        references=(_GLOROT, _SCHOENHOLZ),
    )
)
register(
    Rule(
        code="GS302",
        name="saturation-measured",
        category="saturation",
        severity="warning",
        summary="The probe measured many sigmoid/tanh/hardtanh outputs in their flat tails.",
        what="On the probe batches, the share of the activation's outputs whose derivative is "
        "below 1% of its maximum is above the threshold.",
        why="Saturated units pass (almost) no gradient back; a layer with most units saturated "
        "starves everything below it.",
        fix="Lower the initial weight scale feeding the activation, add normalisation before "
        "it, or swap it for a non-saturating one (ReLU/GELU).",
        references=(_GLOROT,),
    )
)
register(
    Rule(
        code="GS401",
        name="dead-units-measured",
        category="dead_units",
        severity="warning",
        summary="Many ReLU-like units never activated on any probe sample.",
        what="A unit (a channel for convolutions) whose output was 0 (ReLU) or negative on "
        "every probe sample is dead: its gradient, and its input weights' gradient, are 0.",
        why="Dead units never recover under gradient descent; a layer whose units are all dead "
        "cuts the gradient to every layer below it.",
        fix="Zero the biases at initialisation (strongly negative biases kill ReLUs), use "
        "Kaiming fan_in, lower the learning rate, or use LeakyReLU/GELU.",
        references=(_LU, _HE),
    )
)
register(
    Rule(
        code="GS402",
        name="negative-bias-before-relu",
        category="dead_units",
        severity="warning",
        summary="A strongly negative bias before a ReLU is predicted to switch most of its "
        "units off.",
        what="The layer's bias is negative on average by more than half the pre-activation's "
        "standard deviation (predicted by the static estimate), so most units are inactive "
        "on most samples, and stacked layers compound it.",
        why="A ReLU unit that is off passes no gradient; negative biases in several layers in a "
        "row switch whole layers off (dying ReLU).",
        fix="Initialise biases to 0 (or a small positive value) before ReLUs.",
        references=(_LU,),
    )
)
register(
    Rule(
        code="GS602",
        name="learning-rate-layer-outlier",
        category="learning_rate",
        severity="info",
        summary="With the given learning rate, some layers' first update is outside "
        "[1e-4, 1e-2] of their weight norm while the median layer's is fine.",
        what="The probe computed each layer's first optimiser step without taking it; these "
        "layers fall outside the healthy band of update/weight ratios.",
        why="Layers stepping 1e-2 of their norm or more are rewritten in a few steps; layers "
        "below 1e-4 barely move.",
        fix="Put those layers in their own parameter group with a learning rate scaled by the "
        "factor given, or fix their initialisation scale.",
        references=("CS231n, Neural Networks Part 3: ratio of weights:updates",),
    )
)
register(
    Rule(
        code="GS701",
        name="deep-plain-stack",
        category="architecture",
        severity="info",
        summary="A long run of weight layers has no skip connection around it.",
        what="The longest path through the graph that no residual add bypasses crosses many "
        "weight layers. The gradient has to pass through every one of them, so per-layer gains "
        "even slightly off 1 compound (chi^L).",
        why="Deep plain networks train worse than residual ones of the same depth even when "
        "their gradient is healthy at initialisation (the degradation problem), and any "
        "mis-scaled layer makes them vanish or explode.",
        fix="Add identity skips (x + f(x)) around blocks of two weight layers, where the shapes "
        "match; the recommendation names the spans and checks the estimate with them.",
        references=(_HE_RES, _SCHOENHOLZ),
    )
)
register(
    Rule(
        code="GS702",
        name="batchnorm-in-plain-stack",
        category="architecture",
        severity="warning",
        summary="BatchNorm layers inside a deep plain stack: batch normalisation makes the "
        "gradient explode with depth at initialisation when nothing bypasses it.",
        what="BatchNorm in training mode couples the samples of a batch; Yang et al. (2019) show "
        "that in a plain stack this makes the gradient grow geometrically towards the input, "
        "whatever the activation. The finding counts the BatchNorm layers on the plain run.",
        why="With exploding early-layer gradients only very small learning rates are stable; "
        "ResNets avoid it because the skips dominate the backward path.",
        fix="Add residual connections around the blocks (the recommendation names them); in a "
        "ResNet, zero-initialise each block's last BatchNorm weight.",
        references=(_YANG, _DE_SMITH),
    )
)
register(
    Rule(
        code="GS703",
        name="post-ln-transformer",
        category="architecture",
        severity="warning",
        summary="Post-LN transformer: LayerNorm after each residual add; it needs learning-rate "
        "warmup to train.",
        what="Each block computes LayerNorm(x + f(x)), so the residual stream passes through a "
        "normalisation at every block. Xiong et al. (2020) show the expected gradient of the "
        "last layers' weights is then large at initialisation, independent of depth, so "
        "large early steps destabilise training unless the learning rate is warmed up.",
        why="Without warmup Post-LN transformers often diverge or get stuck; Pre-LN "
        "(x + f(LayerNorm(x)), plus a final LayerNorm) trains without it.",
        fix="Warm the learning rate up (thousands of steps), or move to Pre-LN: "
        "norm_first=True on nn.TransformerEncoderLayer, or LayerNorm on each sublayer's input "
        "and one after the last block.",
        references=(_XIONG, "Liu et al. 2020, Understanding the Difficulty of Training "
                    "Transformers (EMNLP)"),
    )
)
register(
    Rule(
        code="GS704",
        name="unscaled-residual-stack",
        category="architecture",
        severity="warning",
        summary="A deep stack of residual blocks with neither normalisation nor scaled "
        "branches: the signal's variance grows with every block.",
        what="x + f(x) with f at unit gain doubles the variance per block; without a "
        "normalisation or a branch scale, the forward signal and the gradient grow "
        "geometrically with the number of blocks.",
        why="The first steps then overshoot; Fixup and SkipInit scale each branch so the "
        "whole stack starts near the identity.",
        fix="Multiply each branch by a scale (1/sqrt(number of blocks), or a learnable scalar "
        "initialised at 0), or zero-initialise each branch's last layer, or add normalisation.",
        references=(_ZHANG_FIXUP, _DE_SMITH, _HE_RES),
    )
)
register(
    Rule(
        code="GS705",
        name="sigmoid-hidden-units",
        category="architecture",
        severity="warning",
        summary="Sigmoid used as a hidden activation (not as a gate or the output).",
        what="A sigmoid's output feeds another weight layer. Its derivative is at most 0.25 "
        "and its output is not centred (mean 0.5), so each such layer keeps a few percent "
        "of the gradient's squared norm and shifts the next layer's inputs.",
        why="Glorot & Bengio (2010) traced the failure of deep sigmoid networks to exactly "
        "this: top hidden layers saturate and the gradient vanishes below them.",
        fix="Use ReLU/GELU (with Kaiming init) or tanh (zero-centred) for hidden units; keep "
        "sigmoid for gates and binary outputs.",
        references=(_GLOROT,),
    )
)
register(
    Rule(
        code="GS706",
        name="depth-large-for-width",
        category="architecture",
        severity="warning",
        summary="The network is deep for its width: the sum of 1/width over its layers is "
        "large, so gradients fluctuate wildly from sample to sample.",
        what="Hanin (2018): in a ReLU network the variance of the squared gradient norm grows "
        "like exp(beta) with beta = sum over hidden layers of 1/width. Large beta means "
        "some inputs get exploding and others vanishing gradients, even at the right init.",
        why="The average gradient may look fine while individual samples' gradients are "
        "orders of magnitude off; training is erratic.",
        fix="Widen the narrow layers or use fewer of them; residual connections also tame it.",
        references=(_HANIN,),
    )
)
register(
    Rule(
        code="GS707",
        name="recurrent-spectral-norm",
        category="architecture",
        severity="warning",
        summary="The recurrent weight's spectral norm is small enough that the gradient "
        "provably vanishes over the unroll.",
        what="For a vanilla RNN h_t = f(W_hh h_(t-1) + ...), the gradient through k steps is "
        "bounded by (sigma_max(W_hh) * max|f'|)^k (Pascanu et al. 2013); below 1 per step it "
        "vanishes over the sequence length.",
        why="Dependencies longer than a few steps cannot be learned.",
        fix="Initialise W_hh orthogonally (all singular values 1), or use an LSTM/GRU.",
        references=(_PASCANU,),
    )
)
register(
    Rule(
        code="GS708",
        name="lstm-forget-bias-zero",
        category="architecture",
        severity="info",
        summary="An LSTM keeps PyTorch's default forget-gate bias of 0.",
        what="With the forget gate's bias at 0 the gate starts at sigmoid(0) = 0.5: the cell "
        "state, and its gradient, halves every step.",
        why="Jozefowicz et al. (2015) found a forget bias of 1 closes most of the gap between "
        "LSTMs and the best architectures; 0 makes long dependencies hard to learn.",
        fix="Set the forget-gate slice of bias_ih to 1 (3 or more for 100+ steps) and of "
        "bias_hh to 0.",
        references=("Jozefowicz, Zaremba & Sutskever 2015, An Empirical Exploration of "
                    "Recurrent Network Architectures", "Gers, Schmidhuber & Cummins 2000, "
                    "Learning to Forget"),
    )
)
