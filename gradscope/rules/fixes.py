"""Recommendations with the numbers filled in, each change verified on a copy first.

Every architecture, activation, normalisation or initialisation fix is built
as a :class:`~gradscope.rules.variants.Variant` of the traced graph,
re-estimated, and returned only if it moves the targeted figure towards 1 by a
clear margin (:func:`~gradscope.rules.variants.improves`); the recommendation
then carries the before -> after figures. The rule families reach this module
only through ``analysis.fixer`` (:class:`Fixer`), so that they stay free of torch
and every costly estimate is memoised once per analysis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import networkx as nx

from gradscope.estimate.statistics import tensor_stats, var_of
from gradscope.records import Recommendation, Verification
from gradscope.rules.actions import (
    SWAPPABLE,
    init_action,
    norm_action,
    norm_first_action,
    residual_action,
    swap_action,
    zero_bias_action,
)
from gradscope.rules.base import fmt, signal_inputs, stream_and_branch
from gradscope.rules.health import log_distance
from gradscope.rules.recurrent_fixes import lstm_forget_bias, recurrent_fixes, spectral_norm
from gradscope.rules.variants import (
    Variant,
    extreme_health,
    fan_in,
    hidden_activation,
    improves,
    init_scale,
    reinitialise,
    weight_and_bias,
    weight_layers,
)
from gradscope.tracing.graph import Ref, node_record, set_record
from gradscope.tracing.ops import SATURATING

if TYPE_CHECKING:
    from gradscope.estimate.engine import StaticEstimate
    from gradscope.rules.base import Analysis

#: Figure names used in before -> after, so reports say what moved.
ENTRY_METRIC = "gradient ratio at the first trainable layers (static estimate)"


def _names(modules: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(modules[:limit])
    return shown + (f" and {len(modules) - limit} more" if len(modules) > limit else "")


@dataclass
class Fixer:
    """Builds verified recommendations for one analysis.

    ``worst`` is "low" for vanishing findings (the smallest entry ratio is the
    figure) and "high" for exploding ones.
    """

    analysis: Analysis

    def __post_init__(self) -> None:
        self.entries = list(self.analysis.facts.entries)
        self.traced = self.analysis.traced
        self.graph = self.traced.graph

    # -- verification --------------------------------------------------------
    def _estimate(self, variant: Variant) -> StaticEstimate | None:
        try:
            return variant.estimate(self.analysis.inputs, self.analysis.declared,
                                    self.analysis.estimate.batches)
        except Exception:  # noqa: BLE001 - a fix we cannot estimate is a fix we do not offer
            return None

    def entry_verification(self, variant: Variant, worst: str) -> Verification | None:
        """The entry-layer ratio before and after; None unless the change improves it."""
        before = extreme_health(self.analysis.estimate, self.entries, worst)
        est = self._estimate(variant)
        if est is None:
            return None
        after = extreme_health(est, self.entries, worst)
        if after is None or not improves(before, after):
            return None
        return Verification(ENTRY_METRIC, _finite_or_zero(before), after)

    def metric_verification(self, variant: Variant, metric: str,
                            figure: Callable[[StaticEstimate], float | None],
                            ) -> Verification | None:
        before = figure(self.analysis.estimate)
        est = self._estimate(variant)
        if est is None:
            return None
        after = figure(est)
        if after is None or not improves(before, after):
            return None
        return Verification(metric, _finite_or_zero(before), after)

    # -- the model's pieces --------------------------------------------------
    def module_of(self, node: str) -> str:
        return str(node_record(self.graph, node).module or node)

    def saturating_hidden(self) -> list[str]:
        """sigmoid/tanh-like nodes whose output reaches another weight layer (not gates)."""
        weights = set(weight_layers(self.traced))
        found = []
        for node in self.traced.order():
            key = node_record(self.graph, node).key
            if not key.startswith("activation:") or key.split(":", 1)[1] not in SATURATING:
                continue
            if feeds_weight_layer(self.analysis, node, weights):
                found.append(node)
        return found

    # -- recommendations -----------------------------------------------------
    def activation_swap(self, worst: str = "low") -> Recommendation | None:
        """Saturating hidden activations -> ReLU with Kaiming fan_in, as one change.

        Several rules offer it (GS101/102, GS301/302, GS705): estimated once per analysis.
        """
        return self.analysis.remember(f"activation_swap:{worst}",
                                      lambda: self._activation_swap(worst))

    def _activation_swap(self, worst: str) -> Recommendation | None:
        nodes = self.saturating_hidden()
        if not nodes:
            return None
        variant = Variant(self.traced)
        for node in nodes:
            variant.swap_activation(node, "relu")
        reinitialise(variant, weight_layers(self.traced), 2.0)
        check = self.entry_verification(variant, worst)
        if check is None:
            return None
        swap = swap_action(self.analysis, nodes)
        init = init_action(self.analysis, weight_layers(self.traced), 2.0)
        action = {"op": "sequence", "actions": [swap, init]} if swap and init else None
        kinds = sorted({node_record(self.graph, n).key.split(":", 1)[1] for n in nodes})
        classes = ", ".join(f"nn.{SWAPPABLE[k].__name__}" if k in SWAPPABLE else f"nn.{k}"
                            for k in kinds)
        return Recommendation(
            "activation",
            f"Replace the {len(nodes)} hidden {'/'.join(kinds)} activation(s) "
            f"({_names([self.module_of(n) for n in nodes])}) with ReLU and initialise the "
            f"weight layers Kaiming fan_in: the predicted gradient ratio at the first layers "
            f"goes from {fmt(check.before)} to {fmt(check.after)}.",
            "import torch.nn as nn\n\n"
            "def swap_activations(module: nn.Module) -> None:\n"
            "    for name, child in module.named_children():\n"
            f"        if isinstance(child, ({classes},)):\n"
            "            setattr(module, name, nn.ReLU())\n"
            "        else:\n"
            "            swap_activations(child)\n\n"
            "swap_activations(model)  # functional calls (torch.sigmoid) need editing by hand\n"
            + _INIT_LOOP.format(how="kaiming_normal_(m.weight, mode=\"fan_in\", "
                                "nonlinearity=\"relu\")"),
            check, tuple(self.module_of(n) for n in nodes), action)

    def initialization(self, worst: str) -> Recommendation | None:
        """Re-initialise every weight layer for the model's hidden activation (memoised)."""
        return self.analysis.remember(f"initialization:{worst}",
                                      lambda: self._initialization(worst))

    def _initialization(self, worst: str) -> Recommendation | None:
        act = hidden_activation(self.traced)
        if act in ("sigmoid", "hardsigmoid", "logsigmoid"):
            return None  # no scale makes a sigmoid stack critical: the activation is the fix
        layers = weight_layers(self.traced)
        if not layers:
            return None
        gain_sq, how = init_scale(act)
        if already_initialised(self.analysis, layers, gain_sq):
            return None
        variant = Variant(self.traced)
        reinitialise(variant, layers, gain_sq)
        check = self.entry_verification(variant, worst)
        if check is None:
            return None
        std = f"sqrt({gain_sq:.3g} / fan_in)"
        return Recommendation(
            "initialization",
            f"Initialise the {len(layers)} weight layers for {act or 'linear'} units with "
            f"std = {std} and zero biases: the predicted gradient ratio at the first layers "
            f"goes from {fmt(check.before)} to {fmt(check.after)}.",
            "import math\nimport torch.nn as nn\n" + _INIT_LOOP.format(how=how.replace(
                "(w,", "(m.weight,").replace("fan_in))", "m.weight[0].numel()))")),
            check, tuple(self.module_of(n) for n in layers),
            init_action(self.analysis, layers, gain_sq))

    def zero_bias(self, nodes: Sequence[str], worst: str = "low") -> Recommendation | None:
        """Biases before ReLUs set to 0 (memoised: GS401 and GS402 offer it for the same
        layers, and each offer costs an estimate)."""
        return self.analysis.remember(f"zero_bias:{worst}:{list(nodes)!r}",
                                      lambda: self._zero_bias(nodes, worst))

    def _zero_bias(self, nodes: Sequence[str], worst: str) -> Recommendation | None:
        variant = Variant(self.traced)
        for node in nodes:
            _, bias = weight_and_bias(self.traced, node)
            variant.set_moments(bias, (0.0, 0.0))
        check = self.entry_verification(variant, worst)
        if check is None:
            return None
        modules = [self.module_of(n) for n in nodes]
        return Recommendation(
            "initialization",
            f"Initialise the biases of {_names(modules)} to 0: the predicted gradient ratio at "
            f"the first layers goes from {fmt(check.before)} to {fmt(check.after)}.",
            "import torch\nimport torch.nn as nn\n\nwith torch.no_grad():\n"
            f"    for name in {modules!r}:\n"
            "        nn.init.zeros_(model.get_submodule(name).bias)",
            check, tuple(modules), zero_bias_action(self.analysis, nodes))

    def residual(self, worst: str) -> Recommendation | None:
        """Identity skips around blocks of two weight layers on the longest plain run
        (memoised: GS701's plain run and the vanishing fixes offer the same, and each
        offer costs two estimates)."""
        return self.analysis.remember(f"residual:{worst}", lambda: self._residual(worst))

    def _residual(self, worst: str) -> Recommendation | None:
        spans = plain_blocks(self.analysis)
        if not spans:
            return None
        best: tuple[Verification, float] | None = None
        for alpha in (1.0, 1.0 / math.sqrt(len(spans))):
            variant = Variant(self.traced)
            summed: dict[str, str] = {}
            for start, end, _ in spans:
                # A block that starts where the previous one ended reads that block's sum
                # (x + f(x)), not its bare output: skips chain, as wrapping each span in
                # a Residual module does (gradscope.fixes.apply).
                summed[end] = variant.add_residual(summed.get(start, start), end, alpha)
            check = self.entry_verification(variant, worst)
            if check is not None and (best is None or _closer(check.after, best[0].after)):
                best = (check, alpha)
            if len(spans) == 1:
                break
        if best is None:
            return None
        check, alpha = best
        where = "; ".join(f"{first} .. {last}" for _, _, (first, last) in spans[:4])
        more = f" and {len(spans) - 4} more" if len(spans) > 4 else ""
        scale = "" if alpha == 1.0 else f" scaled by {alpha:.3g} (1/sqrt({len(spans)} blocks))"
        return Recommendation(
            "residual_connection",
            f"Add {len(spans)} identity skip(s){scale} around blocks of two weight layers "
            f"where the shapes match ({where}{more}); each add goes after the block's last "
            f"activation: the predicted gradient ratio at the first layers goes from "
            f"{fmt(check.before)} to {fmt(check.after)}.",
            "import torch.nn as nn\n\n\nclass Residual(nn.Module):\n"
            "    def __init__(self, block: nn.Module, scale: float = "
            f"{alpha:.3g}) -> None:\n"
            "        super().__init__()\n"
            "        self.block, self.scale = block, scale\n\n"
            "    def forward(self, x):\n"
            "        return x + self.scale * self.block(x)\n\n"
            "# wrap each span (first .. last weight layer, with its activations) in Residual:\n"
            f"SPANS = {[(first, last) for _, _, (first, last) in spans]!r}\n"
            "# nn.Sequential(*layers[i:i + block_len]) -> Residual(nn.Sequential(...))",
            check, tuple(f"{first} .. {last}" for _, _, (first, last) in spans),
            residual_action(self.analysis, spans, alpha))

    def normalization_after_layers(self, worst: str) -> Recommendation | None:
        """LayerNorm after each hidden weight layer (before its activation)."""
        layers = weight_layers(self.traced)
        hidden = [n for n in layers[:-1] if node_record(self.graph, n).shape]
        if len(hidden) < 2:
            return None
        variant = Variant(self.traced)
        conv = any(node_record(self.graph, n).key == "conv" for n in hidden)
        for node in hidden:
            variant.insert_norm(node, "batch_norm" if conv else "layer_norm")
        check = self.entry_verification(variant, worst)
        if check is None:
            return None
        norm = "nn.BatchNorm2d(channels)" if conv else "nn.LayerNorm(width)"
        return Recommendation(
            "normalization",
            f"Put a {norm.split('(')[0]} after each of the {len(hidden)} hidden weight layers "
            f"({_names([self.module_of(n) for n in hidden])}), before the activation: the "
            f"predicted gradient ratio at the first layers goes from {fmt(check.before)} to "
            f"{fmt(check.after)}.",
            f"nn.Sequential(layer, {norm}, activation)  # for each hidden layer",
            check, tuple(self.module_of(n) for n in hidden),
            norm_action(self.analysis, hidden, "batch_norm" if conv else "layer_norm"))

    # -- fixes the architecture rules offer -----------------------------------
    def pre_ln(self, pairs: list[tuple[str, str]]) -> Recommendation | None:
        """GS703's Pre-LN fix (see :func:`pre_ln_fix`), estimated once per analysis."""
        return self.analysis.remember("pre_ln", lambda: pre_ln_fix(self.analysis, pairs))  # type: ignore[no-any-return]

    def scaled_residuals(self, unscaled: list[tuple[str, tuple[str, str]]],
                         worst: str) -> Recommendation | None:
        """GS704's fix: scale each residual branch by 1/sqrt(blocks), verified at the entries."""
        alpha = 1.0 / math.sqrt(len(unscaled))
        variant = Variant(self.traced)
        for add, (stream, branch) in unscaled:
            data = node_record(variant.graph, add)
            set_record(variant.graph, replace(data, args=(Ref(stream), Ref(branch)),
                                              kwargs={**data.kwargs, "alpha": alpha}))
        check = self.entry_verification(variant, worst)
        if check is None:
            return None
        return Recommendation(
            "residual_connection",
            f"Scale each of the {len(unscaled)} residual branches by {alpha:.3g} "
            f"(1/sqrt({len(unscaled)}), as in Fixup/SkipInit): the predicted gradient ratio "
            f"at the first layers goes from {fmt(check.before)} to {fmt(check.after)}.",
            f"x = x + {alpha:.3g} * self.block(x)  # in each residual block\n"
            "# or learnable, starting at 0 (SkipInit):\n"
            "# self.gain = nn.Parameter(torch.zeros(())); x = x + self.gain * self.block(x)",
            check)

    def recurrent(self, node: str) -> list[Recommendation]:
        """GS103/GS707/GS708's fixes: forget bias for LSTMs, else orthogonal weights."""
        return recurrent_fixes(self.analysis, node)

    def recurrent_spectral_norm(self, node: str) -> float | None:
        """sigma_max of a vanilla RNN's W_hh (GS707); None for other layers or on meta."""
        return spectral_norm(self.analysis, node)

    def lstm_forget_bias(self, node: str) -> float | None:
        """Mean forget-gate bias of an LSTM (GS708); None for other layers or on meta."""
        return lstm_forget_bias(self.analysis, node)

    # -- measurements of the weights the rules read ---------------------------
    def negative_bias_layers(self) -> list[tuple[str, float]]:
        """Weight layers feeding a ReLU whose bias mean is below -k pre-activation stds."""
        return self.analysis.remember(  # type: ignore[no-any-return]
            "negative_bias_layers", lambda: negative_bias_layers(self.analysis))


_INIT_LOOP = (
    "\nfor m in model.modules():\n"
    "    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):\n"
    "        nn.init.{how}\n"
    "        if m.bias is not None:\n"
    "            nn.init.zeros_(m.bias)")


def _finite_or_zero(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def _closer(a: float, b: float) -> bool:
    return log_distance(a) < log_distance(b)


def feeds_weight_layer(analysis: Analysis, node: str, weights: set[str]) -> bool:
    """Whether ``node``'s output reaches a weight layer's signal input (not via a gate mul)."""
    graph = analysis.traced.graph
    stack = [node]
    seen = {node}
    while stack:
        current = stack.pop()
        for succ in graph.successors(current):
            if succ in seen:
                continue
            seen.add(succ)
            key = node_record(graph, succ).key
            if succ in weights:
                return True
            if key in ("mul", "div") or key.startswith("activation:"):
                continue  # a gate, or another activation that owns the next layer
            stack.append(succ)
    return False


def plain_blocks(analysis: Analysis, size: int = 2,
                 ) -> list[tuple[str, str, tuple[str, str]]]:
    """Spans of ``size`` weight layers on the plain run whose input and output shapes match.

    Each is (node before the block, node after the block's last activation,
    (first module, last module)): the add goes where the next block starts.
    """
    traced = analysis.traced
    graph = traced.graph
    path = list(analysis.facts.plain_run)
    layers = dense_layers(analysis, path)
    inputs: dict[str, str] = {}
    for node in layers:
        signal = [p for p in graph.predecessors(node) if node_record(graph, p).role != "param"]
        on_path = [p for p in signal if p in path]
        if on_path or signal:
            inputs[node] = (on_path or signal)[0]
    spans = []
    i = 0
    while i + size < len(layers):
        first, last, after = layers[i], layers[i + size - 1], layers[i + size]
        start, end = inputs.get(first), inputs.get(after)
        if start is not None and end is not None \
                and node_record(graph, start).shape == node_record(graph, end).shape \
                and node_record(graph, start).shape is not None:
            module = (str(node_record(graph, first).module or first),
                      str(node_record(graph, last).module or last))
            spans.append((start, end, module))
            i += size
        else:
            i += 1
    return spans


def dense_layers(analysis: Analysis, nodes: Sequence[str]) -> list[str]:
    """The linear and convolution layers among ``nodes``: what "depth" counts.

    Normalisations own weights too, but they are not layers a skip goes around.
    """
    return [n for n in nodes if analysis.traced.node(n).is_dense]


def already_initialised(analysis: Analysis, layers: Sequence[str], gain_sq: float) -> bool:
    """Whether every layer's weights already have Var W ~ gain^2/fan_in and biases ~ 0.

    Then re-initialising only redraws the same distribution: the estimate on
    idealised moments would look better than the realised draw, but a user
    applying the fix would get another draw of the same thing.
    """
    for node in layers:
        w, b = weight_and_bias(analysis.traced, node)
        if w is None:
            continue
        stats = tensor_stats(w)
        if stats is None:
            return False
        target = gain_sq / fan_in(node_record(analysis.traced.graph, node).key, w)
        if not 1 / 1.5 <= stats[1] / max(target, 1e-30) <= 1.5:
            return False
        b_stats = tensor_stats(b) if b is not None else (0.0, 0.0)
        if b_stats is not None and b_stats[1] > 0.1 * target:
            return False
    return True


def _branch_weight(analysis: Analysis, graph: nx.DiGraph, branch_out: str) -> str | None:
    """The weight layer closest upstream of a residual branch's output."""
    node: str | None = branch_out
    seen = 0
    while node is not None and seen < 64:
        if analysis.traced.node(node).trainable:
            return node
        preds = signal_inputs(graph, node)
        node = preds[0] if preds else None
        seen += 1
    return None


def _weight_grad(graph: nx.DiGraph, est: StaticEstimate, node: str) -> float | None:
    """Static ||grad W||^2 of a weight layer up to a constant: S(out) x q(in) x fan-in share."""
    ins = signal_inputs(graph, node)
    if not ins:
        return None
    sq = est.sq_norm.get(node)
    mom = est.moments.get(ins[0])
    if sq is None or mom is None:
        return None
    return sq * mom[1]


def _between(graph: nx.DiGraph, start: str, end: str) -> set[str]:
    """``descendants(start) & ancestors(end)``: the ancestors of ``end`` reached from
    ``start``. Searched within the ancestors (every node on a path from ``start`` to one of
    them is one of them too), not over all of ``start``'s descendants, which in a stack of
    blocks is the rest of the graph for every block."""
    above = nx.ancestors(graph, end)
    found: set[str] = set()
    stack = [start]
    while stack:
        for succ in graph.successors(stack.pop()):
            if succ in above and succ not in found:
                found.add(succ)
                stack.append(succ)
    return found


def pre_ln_fix(analysis: Analysis, pairs: list[tuple[str, str]]) -> Recommendation | None:
    """Move each LayerNorm onto its sublayer's input (Pre-LN); the last one stays as final norm.

    Verified on the figure Xiong et al. (2020) tie warmup to: the weight gradient
    of the last block's output layer. Post-LN makes the last layers' weight
    gradients large at initialisation, independent of depth; Pre-LN scales them
    down with the depth.
    """
    base = analysis.traced.graph
    ends = [(add, stream_and_branch(base, add)) for add, _ in pairs]
    found = [_branch_weight(analysis, base, sb[1]) for _, sb in ends if sb is not None]
    weights = [w for w in found if w is not None]
    if len(weights) < 2:
        return None
    last_w = weights[-1]
    variant = Variant(analysis.traced)
    for i, (add, norm) in enumerate(pairs):
        split = stream_and_branch(variant.graph, add)
        if split is None:
            return None
        stream, branch_out = split
        branch = _between(variant.graph, stream, branch_out)
        branch.add(branch_out)
        shape = node_record(variant.graph, stream).shape or [1]
        pre = variant.insert("pre_ln", stream, "layer_norm", "layer_norm",
                             (Ref(stream), [shape[-1]]), like=stream)
        for node in sorted(branch, key=lambda n: node_record(variant.graph, n).index):
            if stream in node_record(variant.graph, node).inputs:
                variant.replace_input(node, stream, pre)
        if i < len(pairs) - 1:
            variant.redirect(norm, add)  # the last post-norm stays: Pre-LN's final norm

    def figure(graph: nx.DiGraph, est: StaticEstimate) -> float | None:
        value = _weight_grad(graph, est, last_w)
        return math.sqrt(value) if value is not None and value >= 0 else None

    try:
        after_est = variant.estimate(analysis.inputs, analysis.declared,
                                     analysis.estimate.batches)
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
        f"output-layer weight gradient goes from {fmt(before)} to {fmt(after)} of the output "
        f"gradient, so early steps need no warmup (first Post-LN norm: {module}).",
        "# nn.TransformerEncoderLayer / nn.TransformerDecoderLayer:\n"
        "layer = nn.TransformerEncoderLayer(d_model, nhead, norm_first=True)\n"
        "encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model))\n\n"
        "# hand-written blocks:\n"
        "def forward(self, x):\n"
        "    x = x + self.attn(self.norm1(x))\n"
        "    return x + self.mlp(self.norm2(x))",
        check, action=norm_first_action(analysis, [norm for _, norm in pairs]))


def negative_bias_layers(analysis: Analysis) -> list[tuple[str, float]]:
    """Weight layers feeding a ReLU whose bias mean is below -k pre-activation stds."""
    graph = analysis.traced.graph
    found = []
    for node in weight_layers(analysis.traced):
        succ = list(graph.successors(node))
        if not any(node_record(graph, s).key in ("activation:relu", "activation:relu6")
                   for s in succ):
            continue
        _, bias = weight_and_bias(analysis.traced, node)
        mom = analysis.estimate.moments.get(node)
        if bias is None or mom is None:
            continue
        stats = tensor_stats(bias)
        if stats is None:
            continue
        # An input that is already all zero leaves only the bias: any negative bias
        # then switches every unit off (score capped at -10 std).
        sd = math.sqrt(max(var_of(mom), 0.0))
        score = max(stats[0] / sd, -10.0) if sd > 1e-12 else (-10.0 if stats[0] < 0 else 0.0)
        if score < -analysis.thresholds.negative_bias:
            found.append((node, score))
    return found
