"""Architecture checks (GS7xx), and the through-time fixes of recurrent layers.

These read the graph's structure (plain runs, residual adds, where the
normalisations sit, layer widths) and the recurrent modules' weights. Like
every check they only read the analysis and return findings; fixes that
change the model are verified on a copy (:mod:`gradscope.rules.recommend`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import networkx as nx
import torch

from gradscope.estimate.depth import _is_weight_layer, residual_adds
from gradscope.fixes import Variant, extreme_health, improves, log_distance
from gradscope.report import Finding, Recommendation, Verification
from gradscope.rules.checks import (
    Analysis,
    _finding,
    _location,
    _op_of,
    entry_nodes,
    warmup_recommendation,
)
from gradscope.rules.recommend import Fixer, _fmt, dense_layers, plain_run_path
from gradscope.tracing.graph import Ref, node_record, set_record

if TYPE_CHECKING:
    from gradscope.estimate.engine import StaticEstimate

NORM_KEYS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")


def _worst(analysis: Analysis) -> str:
    """"low" if the entry layers' predicted ratio is below 1, else "high"."""
    entries = analysis.remember("entry_nodes", lambda: entry_nodes(analysis))
    low = extreme_health(analysis.estimate, entries, "low")
    high = extreme_health(analysis.estimate, entries, "high")
    if low is None or high is None:
        return "low"
    return "low" if log_distance(low) >= log_distance(high) else "high"


# ---------------------------------------------------------------------------
# GS701 / GS702 / GS706: the plain run


def check_plain_stack(analysis: Analysis) -> list[Finding]:
    t = analysis.thresholds
    graph = analysis.traced.graph
    path = plain_run_path(analysis)
    layers = dense_layers(analysis, path)
    findings: list[Finding] = []
    if len(layers) < 2:
        return findings
    first, last = layers[0], layers[-1]
    span = (f"{node_record(graph, first).module or first} .. "
            f"{node_record(graph, last).module or last}")
    fixes = analysis.remember("plain_residual", lambda: Fixer(analysis).residual(
        _worst(analysis)))
    if len(layers) >= t.plain_depth:
        findings.append(_finding(
            "GS701",
            f"{len(layers)} weight layers in a row with no skip connection ({span}); "
            f"threshold {t.plain_depth}.",
            _location(analysis, first), None, [fixes] if fixes else [],
            {"plain_layers": len(layers), "threshold": t.plain_depth}))
        norms = [n for n in path if node_record(graph, n).key == "batch_norm"]
        if len(norms) >= 2:
            findings.append(_finding(
                "GS702",
                f"{len(norms)} BatchNorm layers inside a plain run of {len(layers)} weight "
                f"layers ({span}): batch normalisation without skips makes the gradient grow "
                "geometrically towards the input (Yang et al. 2019).",
                _location(analysis, norms[0]), None, [fixes] if fixes else [],
                {"batchnorm_layers": len(norms), "plain_layers": len(layers)}))
    widths = []
    for node in layers[:-1]:  # the hidden layers: the last one is the head
        shape = node_record(graph, node).shape
        if not shape:
            continue
        width = shape[1] if node_record(graph, node).key == "conv" and len(shape) > 1 else shape[-1]
        if width > 0:
            widths.append(width)
    beta = sum(1.0 / w for w in widths)
    if beta >= t.width_beta and len(widths) >= 2:
        narrow = min(widths)
        findings.append(_finding(
            "GS706",
            f"sum of 1/width over {len(widths)} hidden layers is {beta:.2f} (narrowest "
            f"{narrow}; threshold {t.width_beta:g}): per-sample gradient norms fluctuate "
            f"by about exp({beta:.2f}) = {math.exp(beta):.1f}x in variance (Hanin 2018).",
            _location(analysis, first), None, [],
            {"beta": beta, "hidden_layers": len(widths), "narrowest": narrow,
             "threshold": t.width_beta}))
    return findings


# ---------------------------------------------------------------------------
# GS703: Post-LN


def post_ln_pairs(analysis: Analysis) -> list[tuple[str, str]]:
    """(residual add, LayerNorm right after it) pairs: x_(k+1) = LayerNorm(x_k + f(x_k))."""
    graph = analysis.traced.graph
    pairs = []
    adds = residual_adds(analysis.traced)
    add_set = set(adds)
    for add in adds:
        succ = list(graph.successors(add))
        if len(succ) != 1 or node_record(graph, succ[0]).key not in ("layer_norm", "rms_norm"):
            continue
        norm = succ[0]
        # the normalised sum is the stream: it feeds a later residual add or the output
        downstream = nx.descendants(graph, norm)
        if downstream & add_set or norm == analysis.traced.output_node \
                or analysis.traced.output_node in downstream:
            pairs.append((add, norm))
    return pairs


def _signal_inputs(graph: nx.DiGraph, node: str) -> list[str]:
    return [r for r in node_record(graph, node).inputs
            if node_record(graph, r).role != "param" and node_record(graph, r).is_float]


def _stream_and_branch(graph: nx.DiGraph, add: str) -> tuple[str, str] | None:
    ins = _signal_inputs(graph, add)
    if len(ins) != 2:
        return None
    a, b = ins
    if nx.has_path(graph, a, b):
        return a, b
    if nx.has_path(graph, b, a):
        return b, a
    return None


def _branch_weight(analysis: Analysis, graph: nx.DiGraph, branch_out: str) -> str | None:
    """The weight layer closest upstream of a residual branch's output."""
    node: str | None = branch_out
    seen = 0
    while node is not None and seen < 64:
        if _is_weight_layer(analysis.traced, node):
            return node
        preds = _signal_inputs(graph, node)
        node = preds[0] if preds else None
        seen += 1
    return None


def _weight_grad(graph: nx.DiGraph, est: StaticEstimate, node: str) -> float | None:
    """Static ||grad W||^2 of a weight layer up to a constant: S(out) x q(in) x fan-in share."""
    ins = _signal_inputs(graph, node)
    if not ins:
        return None
    sq = est.sq_norm.get(node)
    mom = est.moments.get(ins[0])
    if sq is None or mom is None:
        return None
    return sq * mom[1]


def pre_ln_fix(analysis: Analysis, pairs: list[tuple[str, str]]) -> Recommendation | None:
    """Move each LayerNorm onto its sublayer's input (Pre-LN); the last one stays as final norm.

    Verified on the figure Xiong et al. (2020) tie warmup to: the weight gradient
    of the last block's output layer. Post-LN makes the last layers' weight
    gradients large at initialisation, independent of depth; Pre-LN scales them
    down with the depth.
    """
    base = analysis.traced.graph
    ends = [(add, _stream_and_branch(base, add)) for add, _ in pairs]
    found = [_branch_weight(analysis, base, sb[1]) for _, sb in ends if sb is not None]
    weights = [w for w in found if w is not None]
    if len(weights) < 2:
        return None
    last_w = weights[-1]
    variant = Variant(analysis.traced)
    for i, (add, norm) in enumerate(pairs):
        split = _stream_and_branch(variant.graph, add)
        if split is None:
            return None
        stream, branch_out = split
        branch = (nx.descendants(variant.graph, stream) & nx.ancestors(variant.graph, branch_out))
        branch.add(branch_out)
        shape = node_record(variant.graph, stream).shape or [1]
        pre = variant.insert("pre_ln", stream, "layer_norm", "layer_norm",
                             (_ref(stream), [shape[-1]]), like=stream)
        for node in sorted(branch, key=lambda n: node_record(variant.graph, n).index):
            if stream in node_record(variant.graph, node).inputs:
                variant.replace_input(node, stream, pre)
        if i < len(pairs) - 1:
            variant.redirect(norm, add)  # the last post-norm stays: Pre-LN's final norm

    def figure(graph: nx.DiGraph, est: StaticEstimate) -> float | None:
        value = _weight_grad(graph, est, last_w)
        return math.sqrt(value) if value is not None and value >= 0 else None

    try:
        after_est = variant.estimate(analysis.inputs, analysis.declared)
    except Exception:  # noqa: BLE001 - a fix we cannot estimate is not offered
        return None
    before = figure(base, analysis.estimate)
    after = figure(variant.graph, after_est)
    # Lower is the point (Xiong et al.: the last layers' large gradients are what warmup
    # protects against); 10% is above the estimate's noise for the same weights.
    if before is None or after is None or not after < before / 1.1:
        return None
    last_module = node_record(base, last_w).module or last_w
    check = Verification(f"last block's output-layer ({last_module}) "
                         "weight-gradient norm relative to the output gradient (static "
                         "estimate)", before, after)
    module = node_record(base, pairs[0][1]).module or pairs[0][1]
    return Recommendation(
        "normalization",
        f"Move to Pre-LN: normalise each sublayer's input instead of the residual sum "
        f"(x + f(LayerNorm(x))), with one LayerNorm after the last block; the last block's "
        f"output-layer weight gradient goes from {_fmt(before)} to {_fmt(after)} of the output "
        f"gradient, so early steps need no warmup (first Post-LN norm: {module}).",
        "# nn.TransformerEncoderLayer / nn.TransformerDecoderLayer:\n"
        "layer = nn.TransformerEncoderLayer(d_model, nhead, norm_first=True)\n"
        "encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model))\n\n"
        "# hand-written blocks:\n"
        "def forward(self, x):\n"
        "    x = x + self.attn(self.norm1(x))\n"
        "    return x + self.mlp(self.norm2(x))",
        check)


def _ref(name: str) -> object:

    return Ref(name)


def check_post_ln(analysis: Analysis) -> list[Finding]:
    pairs = post_ln_pairs(analysis)
    if len(pairs) < 2:
        return []
    optimizer = analysis.probe.optimizer if analysis.probe is not None else None
    fixes = [warmup_recommendation(optimizer or "adam")]
    pre = pre_ln_fix(analysis, pairs)
    if pre is not None:
        fixes.append(pre)
    first_norm = pairs[0][1]
    return [_finding(
        "GS703",
        f"Post-LN: {len(pairs)} residual adds are each followed by a LayerNorm (first: "
        f"{_op_of(analysis, first_norm)}); the residual stream is renormalised at every "
        "sublayer, which needs learning-rate warmup (Xiong et al. 2020).",
        _location(analysis, first_norm), None, fixes,
        {"post_ln_blocks": len(pairs)})]


# ---------------------------------------------------------------------------
# GS704: residual stack without normalisation or scale

#: Ops that only a normalisation computes: hand-written RMSNorm/LayerNorm (Llama's
#: ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``) has no norm module.
_NORM_OPS = ("rsqrt", "var", "std", "var_mean", "std_mean", "norm", "normalize")


def has_normalisation(graph: nx.DiGraph) -> bool:
    for node in graph.nodes:
        data = node_record(graph, node)
        if data.key in (*NORM_KEYS, "l2_normalize") or data.op in _NORM_OPS:
            return True
        if data.key == "pow" and len(data.args) > 1 and data.args[1] == -0.5:
            return True
    return False


def check_unscaled_residuals(analysis: Analysis) -> list[Finding]:
    graph = analysis.traced.graph
    adds = residual_adds(analysis.traced)
    if len(adds) < analysis.thresholds.residual_blocks:
        return []
    if has_normalisation(graph):
        return []
    unscaled = []
    for add in adds:
        alpha = node_record(graph, add).kwargs.get("alpha", 1.0)
        split = _stream_and_branch(graph, add)
        if split is None or alpha != 1.0:
            continue
        branch_key = node_record(graph, split[1]).key
        if branch_key in ("mul", "div"):
            continue  # x + scale * f(x): already scaled
        unscaled.append((add, split))
    if len(unscaled) < analysis.thresholds.residual_blocks:
        return []
    alpha = 1.0 / math.sqrt(len(unscaled))
    variant = Variant(analysis.traced)
    for add, (stream, branch) in unscaled:

        data = node_record(variant.graph, add)
        set_record(variant.graph, replace(data, args=(Ref(stream), Ref(branch)),
                                          kwargs={**data.kwargs, "alpha": alpha}))
    worst = _worst(analysis)
    check = Fixer(analysis).entry_verification(variant, worst)
    fixes = []
    if check is not None:
        fixes.append(Recommendation(
            "residual_connection",
            f"Scale each of the {len(unscaled)} residual branches by {alpha:.3g} "
            f"(1/sqrt({len(unscaled)}), as in Fixup/SkipInit): the predicted gradient ratio "
            f"at the first layers goes from {_fmt(check.before)} to {_fmt(check.after)}.",
            f"x = x + {alpha:.3g} * self.block(x)  # in each residual block\n"
            "# or learnable, starting at 0 (SkipInit):\n"
            "# self.gain = nn.Parameter(torch.zeros(())); x = x + self.gain * self.block(x)",
            check))
    first = unscaled[0][0]
    ratio = extreme_health(analysis.estimate, entry_nodes(analysis), worst)
    return [_finding(
        "GS704",
        f"{len(unscaled)} residual blocks with neither normalisation nor a branch scale "
        f"(first: {_op_of(analysis, first)}); predicted gradient ratio at the first layers "
        f"{_fmt(ratio)}.",
        _location(analysis, first), None, fixes,
        {"residual_blocks": len(unscaled), "gradient_ratio": ratio})]


# ---------------------------------------------------------------------------
# GS705: sigmoid hidden units


def check_sigmoid_hidden(analysis: Analysis) -> list[Finding]:
    fixer = Fixer(analysis)
    nodes = [n for n in fixer.saturating_hidden()
             if node_record(analysis.traced.graph, n).key in ("activation:sigmoid",
                                                          "activation:hardsigmoid")]
    if not nodes:
        return []
    fix = fixer.activation_swap("low")
    return [_finding(
        "GS705",
        f"{len(nodes)} sigmoid activation(s) used as hidden units (first: "
        f"{_op_of(analysis, nodes[0])}); each keeps at most 1/16 of the gradient's squared "
        "norm and shifts the next layer's inputs by 0.5.",
        _location(analysis, nodes[0]), None, [fix] if fix else [],
        {"sigmoid_hidden": len(nodes)})]


# ---------------------------------------------------------------------------
# GS707 / GS708 and the verified fixes of GS103


def _recurrent_ratio(module: torch.nn.Module, analysis: Analysis, node: str) -> float | None:
    """sqrt(step gain)^(steps - 1) of ``module`` unrolled like ``node``'s layer."""
    from gradscope.estimate.recurrent import estimate_recurrent

    result = analysis.estimate.recurrent.get(node)
    ins = _signal_inputs(analysis.traced.graph, node)
    mom = analysis.estimate.moments.get(ins[0]) if ins else None
    if result is None or mom is None:
        return None
    try:
        new = estimate_recurrent(module, mom[0], mom[1], int(result.steps))
    except (NotImplementedError, ValueError, RuntimeError):
        return None
    return math.sqrt(max(new.step_gain, 0.0)) ** (int(result.steps) - 1)


def _module(analysis: Analysis, node: str) -> torch.nn.Module | None:
    return analysis.traced.modules.get(node_record(analysis.traced.graph, node).module or "")


def _verified_unroll(analysis: Analysis, node: str, module: torch.nn.Module,
                     change: Callable[[torch.nn.Module], None]) -> tuple[float, float] | None:
    """(before, after) first/last-step ratios when ``change`` on a copy improves them."""
    result = analysis.estimate.recurrent[node]
    steps = int(result.steps)
    before = math.sqrt(max(result.step_gain, 0.0)) ** (steps - 1)
    fixed = copy.deepcopy(module)
    with torch.no_grad():
        change(fixed)
    after = _recurrent_ratio(fixed, analysis, node)
    if after is None or not improves(before, after):
        return None
    return before, after


def forget_bias_fix(analysis: Analysis, node: str) -> Recommendation | None:
    """Forget-gate bias 1 (3 for 100+ steps), verified by re-running the unroll on a copy."""
    module = _module(analysis, node)
    result = analysis.estimate.recurrent.get(node)
    if not isinstance(module, torch.nn.LSTM) or result is None \
            or any(p.is_meta for p in module.parameters()):
        return None
    steps = int(result.steps)
    bias = 3.0 if steps >= 100 else 1.0
    hidden = module.hidden_size

    def change(fixed: torch.nn.Module) -> None:
        for name, tensor in fixed.named_parameters():
            if name.startswith("bias_ih"):
                tensor[hidden:2 * hidden].fill_(bias)
            elif name.startswith("bias_hh"):
                tensor[hidden:2 * hidden].zero_()

    verified = _verified_unroll(analysis, node, module, change)
    if verified is None:
        return None
    before, after = verified
    path = node_record(analysis.traced.graph, node).module or node
    return Recommendation(
        "initialization",
        f"Set the forget-gate bias of {path} to {bias:g} "
        f"({'>= 3 for 100+ steps' if bias == 3 else '>= 1'}): "
        f"the predicted gradient reaching the first of {steps} steps, relative to the last, "
        f"goes from {_fmt(before)} to {_fmt(after)}.",
        f"lstm = model.get_submodule({path!r})\n"
        "hidden = lstm.hidden_size\n"
        "with torch.no_grad():\n"
        "    for name, bias in lstm.named_parameters():\n"
        "        if name.startswith(\"bias_ih\"):  # gate order: input, forget, cell, output\n"
        f"            bias[hidden:2 * hidden].fill_({bias:g})\n"
        "        elif name.startswith(\"bias_hh\"):\n"
        "            bias[hidden:2 * hidden].zero_()",
        Verification("first/last step gradient ratio through time (static estimate)",
                     before, after))


def orthogonal_fix(analysis: Analysis, node: str) -> Recommendation | None:
    """Orthogonal recurrent matrices, verified by re-running the unroll on a copy."""
    module = _module(analysis, node)
    result = analysis.estimate.recurrent.get(node)
    if module is None or result is None or any(p.is_meta for p in module.parameters()):
        return None
    steps = int(result.steps)
    gen = torch.Generator().manual_seed(0)

    def change(fixed: torch.nn.Module) -> None:
        for name, tensor in fixed.named_parameters():
            if name.startswith("weight_hh"):
                rows = tensor.shape[0] // tensor.shape[1]
                for k in range(rows):  # one orthogonal block per gate
                    block = tensor[k * tensor.shape[1]:(k + 1) * tensor.shape[1]]
                    q, r = torch.linalg.qr(torch.randn(block.shape, generator=gen,
                                                       dtype=torch.float64))
                    block.copy_((q * torch.sign(torch.diagonal(r))).to(block.dtype))

    verified = _verified_unroll(analysis, node, module, change)
    if verified is None:
        return None
    before, after = verified
    path = node_record(analysis.traced.graph, node).module or node
    return Recommendation(
        "initialization",
        f"Initialise the recurrent matrices of {path} orthogonally (one block per gate): the "
        f"predicted gradient reaching the first of {steps} steps, relative to the last, goes "
        f"from {_fmt(before)} to {_fmt(after)}.",
        f"for name, w in model.get_submodule({path!r}).named_parameters():\n"
        "    if name.startswith(\"weight_hh\"):\n"
        "        for block in w.detach().chunk(w.shape[0] // w.shape[1]):\n"
        "            torch.nn.init.orthogonal_(block)",
        Verification("first/last step gradient ratio through time (static estimate)",
                     before, after))


def recurrent_fixes(analysis: Analysis, node: str) -> list[Recommendation]:
    """GS103's fixes: forget bias for LSTMs, else orthogonal recurrent weights."""
    module = _module(analysis, node)
    fix = forget_bias_fix(analysis, node) if isinstance(module, torch.nn.LSTM) \
        else orthogonal_fix(analysis, node)
    return [fix] if fix is not None else []


def check_recurrent_weights(analysis: Analysis) -> list[Finding]:
    """GS707 (vanilla RNN spectral norm) and GS708 (LSTM forget bias 0)."""
    t = analysis.thresholds
    findings = []
    for node in sorted(analysis.estimate.recurrent):
        module = _module(analysis, node)
        result = analysis.estimate.recurrent[node]
        if module is None or any(p.is_meta for p in module.parameters()):
            continue
        steps = int(result.steps)
        vanishes = math.sqrt(max(result.step_gain, 0.0)) ** max(steps - 1, 0) \
            < t.vanishing_warning
        if isinstance(module, torch.nn.RNN) and steps >= 2:
            norms = [float(torch.linalg.matrix_norm(p.detach().double(), ord=2))
                     for name, p in module.named_parameters() if name.startswith("weight_hh")]
            sigma = max(norms) if norms else 0.0
            bound = sigma ** (steps - 1)
            if sigma < 1.0 and bound < t.vanishing_warning:
                findings.append(_finding(
                    "GS707",
                    f"{_op_of(analysis, node)}: spectral norm of W_hh is {sigma:.3f}, so the "
                    f"gradient through {steps} steps is bounded by {sigma:.3f}^{steps - 1} = "
                    f"{bound:.1e} (Pascanu et al. 2013).",
                    _location(analysis, node), None, recurrent_fixes(analysis, node),
                    {"spectral_norm": sigma, "steps": steps, "bound": bound}))
        if isinstance(module, torch.nn.LSTM) and module.bias and not vanishes:
            hidden = module.hidden_size
            forget = [float(p.detach()[hidden:2 * hidden].double().mean())
                      for name, p in module.named_parameters() if name.startswith("bias_")]
            total = sum(forget) / max(module.num_layers * (2 if module.bidirectional else 1),
                                      1)
            if abs(total) < 0.25:
                findings.append(_finding(
                    "GS708",
                    f"{_op_of(analysis, node)}: forget-gate bias {total:+.2f} on "
                    f"average (PyTorch's default 0): over {steps} steps the cell state keeps "
                    "about half its gradient per step.",
                    _location(analysis, node), None, recurrent_fixes(analysis, node),
                    {"forget_bias": total, "steps": steps}))
    return findings


ARCHITECTURE_CHECKS = (check_plain_stack, check_post_ln, check_unscaled_residuals,
                       check_sigmoid_hidden, check_recurrent_weights)

