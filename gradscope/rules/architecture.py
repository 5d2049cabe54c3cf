"""GS7xx, architecture: structures known to starve or inflate gradients, found on the graph.

Plain runs without skips (GS701), BatchNorm in them (GS702), Post-LN (GS703),
unscaled residual stacks without normalisation (GS704), sigmoid hidden units
(GS705), depth against width (GS706), and recurrent weights (GS707/GS708). The
structure comes from ``analysis.facts`` (one walker for the plain run, one list of
residual adds); the fixes are verified by ``analysis.fixer``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradscope.records import Finding
from gradscope.rules.base import (
    DE_SMITH,
    GLOROT,
    HANIN,
    HE_RES,
    PASCANU,
    SCHOENHOLZ,
    XIONG,
    YANG,
    ZHANG_FIXUP,
    Check,
    Rule,
    RuleFamily,
    fmt,
    location,
    op_of,
    stream_and_branch,
)
from gradscope.rules.learning_rate import warmup_recommendation
from gradscope.tracing.nodes import node_record
from gradscope.tracing.ops import NORM_FUNCTIONS, NORM_KEYS

if TYPE_CHECKING:
    import networkx as nx

    from gradscope.rules.base import Analysis

GS701 = Rule(
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
    references=(HE_RES, SCHOENHOLZ),
)

GS702 = Rule(
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
    references=(YANG, DE_SMITH),
)

GS703 = Rule(
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
    fix="Warm the learning rate up (a share of the run, at most 10%: give --steps), or "
    "move to Pre-LN: norm_first=True on nn.TransformerEncoderLayer, or LayerNorm on each "
    "sublayer's input and one after the last block.",
    references=(XIONG, "Liu et al. 2020, Understanding the Difficulty of Training "
                "Transformers (EMNLP)"),
)

GS704 = Rule(
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
    references=(ZHANG_FIXUP, DE_SMITH, HE_RES),
)

GS705 = Rule(
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
    references=(GLOROT,),
)

GS706 = Rule(
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
    references=(HANIN,),
)

GS707 = Rule(
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
    references=(PASCANU,),
)

GS708 = Rule(
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


# ---------------------------------------------------------------------------
# GS701 / GS702 / GS706: the plain run


def check_plain_stack(analysis: Analysis) -> list[Finding]:
    t = analysis.thresholds
    graph = analysis.traced.graph
    path = list(analysis.facts.plain_run)
    layers = [n for n in path if analysis.traced.node(n).is_dense]
    findings: list[Finding] = []
    if len(layers) < 2:
        return findings
    first, last = layers[0], layers[-1]
    span = (f"{node_record(graph, first).module or first} .. "
            f"{node_record(graph, last).module or last}")
    fixes = analysis.remember("plain_residual", lambda: analysis.fixer.residual(
        analysis.health.worst_direction()))
    if len(layers) >= t.plain_depth:
        findings.append(GS701.finding(
            f"{len(layers)} weight layers in a row with no skip connection ({span}); "
            f"threshold {t.plain_depth}.",
            location(analysis, first), None, [fixes] if fixes else [],
            {"plain_layers": len(layers), "threshold": t.plain_depth}))
        norms = [n for n in path if node_record(graph, n).key == "batch_norm"]
        if len(norms) >= 2:
            findings.append(GS702.finding(
                f"{len(norms)} BatchNorm layers inside a plain run of {len(layers)} weight "
                f"layers ({span}): batch normalisation without skips makes the gradient grow "
                "geometrically towards the input (Yang et al. 2019).",
                location(analysis, norms[0]), None, [fixes] if fixes else [],
                {"batchnorm_layers": len(norms), "plain_layers": len(layers)}))
    widths = []
    for node in layers[:-1]:  # the hidden layers: the last one is the head
        shape = node_record(graph, node).shape
        if not shape:
            continue
        conv = node_record(graph, node).key == "conv" and len(shape) > 1
        width = shape[1] if conv else shape[-1]
        if width > 0:
            widths.append(width)
    beta = sum(1.0 / w for w in widths)
    if beta >= t.width_beta and len(widths) >= 2:
        narrow = min(widths)
        findings.append(GS706.finding(
            f"sum of 1/width over {len(widths)} hidden layers is {beta:.2f} (narrowest "
            f"{narrow}; threshold {t.width_beta:g}): per-sample gradient norms fluctuate "
            f"by about exp({beta:.2f}) = {math.exp(beta):.1f}x in variance (Hanin 2018).",
            location(analysis, first), None, [],
            {"beta": beta, "hidden_layers": len(widths), "narrowest": narrow,
             "threshold": t.width_beta}))
    return findings


# ---------------------------------------------------------------------------
# GS703: Post-LN


def post_ln_pairs(analysis: Analysis) -> list[tuple[str, str]]:
    """(residual add, LayerNorm right after it) pairs: x_(k+1) = LayerNorm(x_k + f(x_k))."""
    graph = analysis.traced.graph
    pairs = []
    adds = analysis.facts.residual_adds
    add_set = set(adds)
    # each add's (stream, branch) split, found once rather than once per other add
    splits = {add: stream_and_branch(graph, add) for add in add_set}
    for add in adds:
        succ = list(graph.successors(add))
        if len(succ) != 1 or node_record(graph, succ[0]).key not in ("layer_norm", "rms_norm"):
            continue
        norm = succ[0]
        # The normalised sum is the stream: the next residual add adds a branch to it, or
        # it reaches the output without crossing another residual add (a Pre-LN encoder's
        # final norm feeding a decoder's cross-attention does neither).
        streams = {split[0] for other, split in splits.items()
                   if other != add and split is not None}
        if norm in streams or _reaches_output_directly(analysis, norm, add_set):
            pairs.append((add, norm))
    return pairs


def _reaches_output_directly(analysis: Analysis, start: str, adds: set[str]) -> bool:
    """Whether the output is reached from ``start`` on a path that crosses none of ``adds``."""
    graph = analysis.traced.graph
    out = analysis.traced.output_node
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        if node == out:
            return True
        for succ in graph.successors(node):
            if succ not in seen and succ not in adds:
                seen.add(succ)
                stack.append(succ)
    return False


def check_post_ln(analysis: Analysis) -> list[Finding]:
    pairs = post_ln_pairs(analysis)
    if len(pairs) < 2:
        return []
    optimizer = analysis.probe.optimizer if analysis.probe is not None else None
    warmup = warmup_recommendation(optimizer or "adam", analysis.steps)
    fixes = [warmup] if warmup is not None else []
    pre = analysis.fixer.pre_ln(pairs)
    if pre is not None:
        fixes.append(pre)
    first_norm = pairs[0][1]
    return [GS703.finding(
        f"Post-LN: {len(pairs)} residual adds are each followed by a LayerNorm (first: "
        f"{op_of(analysis, first_norm)}); the residual stream is renormalised at every "
        "sublayer, which needs learning-rate warmup (Xiong et al. 2020)"
        + ("." if analysis.steps is not None else
           "; give --steps (the planned run's length) for a warmup length."),
        location(analysis, first_norm), None, fixes,
        {"post_ln_blocks": len(pairs)})]


# ---------------------------------------------------------------------------
# GS704: residual stack without normalisation or scale


def has_normalisation(graph: nx.DiGraph) -> bool:
    """A normalisation module, or one written out by hand (Llama's ``x * rsqrt(mean(x^2))``)."""
    for node in graph.nodes:
        data = node_record(graph, node)
        if data.key in (*NORM_KEYS, "l2_normalize") or data.op in NORM_FUNCTIONS:
            return True
        if data.key == "pow" and len(data.args) > 1 and data.args[1] == -0.5:
            return True
    return False


def check_unscaled_residuals(analysis: Analysis) -> list[Finding]:
    graph = analysis.traced.graph
    adds = analysis.facts.residual_adds
    if len(adds) < analysis.thresholds.residual_blocks:
        return []
    if has_normalisation(graph):
        return []
    unscaled = []
    for add in adds:
        alpha = node_record(graph, add).kwargs.get("alpha", 1.0)
        split = stream_and_branch(graph, add)
        if split is None or alpha != 1.0:
            continue
        if node_record(graph, split[1]).key in ("mul", "div"):
            continue  # x + scale * f(x): already scaled
        unscaled.append((add, split))
    if len(unscaled) < analysis.thresholds.residual_blocks:
        return []
    worst = analysis.health.worst_direction()
    fix = analysis.fixer.scaled_residuals(unscaled, worst)
    first = unscaled[0][0]
    extremes = analysis.health.extremes(measured=False)
    ratio = None if extremes is None else (extremes[1] if worst == "low" else extremes[3])
    return [GS704.finding(
        f"{len(unscaled)} residual blocks with neither normalisation nor a branch scale "
        f"(first: {op_of(analysis, first)}); predicted gradient ratio at the first layers "
        f"{fmt(ratio)}.",
        location(analysis, first), None, [fix] if fix else [],
        {"residual_blocks": len(unscaled), "gradient_ratio": ratio})]


# ---------------------------------------------------------------------------
# GS705: sigmoid hidden units


def check_sigmoid_hidden(analysis: Analysis) -> list[Finding]:
    fixer = analysis.fixer
    nodes = [n for n in fixer.saturating_hidden()
             if analysis.traced.node(n).activation in ("sigmoid", "hardsigmoid")]
    if not nodes:
        return []
    fix = fixer.activation_swap("low")
    return [GS705.finding(
        f"{len(nodes)} sigmoid activation(s) used as hidden units (first: "
        f"{op_of(analysis, nodes[0])}); each keeps at most 1/16 of the gradient's squared "
        "norm and shifts the next layer's inputs by 0.5.",
        location(analysis, nodes[0]), None, [fix] if fix else [],
        {"sigmoid_hidden": len(nodes)})]


# ---------------------------------------------------------------------------
# GS707 / GS708: recurrent weights


def check_recurrent_weights(analysis: Analysis) -> list[Finding]:
    """GS707 (vanilla RNN spectral norm) and GS708 (LSTM forget bias 0)."""
    t = analysis.thresholds
    findings = []
    for node in sorted(analysis.estimate.recurrent):
        result = analysis.estimate.recurrent[node]
        steps = int(result.steps)
        vanishes = math.sqrt(max(result.step_gain, 0.0)) ** max(steps - 1, 0) \
            < t.vanishing_warning
        sigma = analysis.fixer.recurrent_spectral_norm(node)
        if sigma is not None and steps >= 2:
            bound = sigma ** (steps - 1)
            if sigma < 1.0 and bound < t.vanishing_warning:
                findings.append(GS707.finding(
                    f"{op_of(analysis, node)}: spectral norm of W_hh is {sigma:.3f}, so the "
                    f"gradient through {steps} steps is bounded by {sigma:.3f}^{steps - 1} = "
                    f"{bound:.1e} (Pascanu et al. 2013).",
                    location(analysis, node), None, analysis.fixer.recurrent(node),
                    {"spectral_norm": sigma, "steps": steps, "bound": bound}))
        total = analysis.fixer.lstm_forget_bias(node)
        if total is not None and not vanishes and abs(total) < 0.25:
            findings.append(GS708.finding(
                f"{op_of(analysis, node)}: forget-gate bias {total:+.2f} on "
                f"average (PyTorch's default 0): over {steps} steps the cell state keeps "
                "about half its gradient per step.",
                location(analysis, node), None, analysis.fixer.recurrent(node),
                {"forget_bias": total, "steps": steps}))
    return findings


FAMILY = RuleFamily(
    number=7,
    rules=(GS701, GS702, GS703, GS704, GS705, GS706, GS707, GS708),
    checks=(Check(("GS701", "GS702", "GS706"), check_plain_stack),
            Check(("GS703",), check_post_ln),
            Check(("GS704",), check_unscaled_residuals),
            Check(("GS705",), check_sigmoid_hidden),
            Check(("GS707", "GS708"), check_recurrent_weights)),
)
