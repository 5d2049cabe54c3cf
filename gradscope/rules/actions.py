"""Machine-readable actions: the change a verified fix made, in terms of the user's modules.

A fix is verified on the traced graph (:mod:`gradscope.rules.variants`); its
``action`` (``Recommendation.action``, applied by ``gradscope.fixes.apply``) has to be
the *same* change made to the real model, or a benchmark that applies it would test
something other than what the report verified. Each builder here therefore checks
that the change can be made by module surgery alone, on the model that was traced:
every node of the change belongs to a module the model has (the same object the
graph recorded), activations are modules (not ``torch.sigmoid`` calls in a
forward), spans are consecutive children of one ``nn.Sequential``. Where one piece
cannot be made that way the builder returns None: an action that did part of a
verified change would be a different, unverified change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from gradscope.rules.variants import fan_in, weight_and_bias
from gradscope.tracing.graph import node_record

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis

#: Activation modules a swap may replace, by the graph's activation name.
SWAPPABLE: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softsign": nn.Softsign,
    "hardsigmoid": nn.Hardsigmoid, "hardtanh": nn.Hardtanh, "logsigmoid": nn.LogSigmoid,
}

#: Weight layers whose fan-in is ``prod(weight.shape[1:])`` (what ``apply`` uses).
_WEIGHT_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def module_at(analysis: Analysis, path: str) -> nn.Module | None:
    """The model's submodule at ``path`` ("" is the model), or None."""
    model = analysis.model
    if not isinstance(model, nn.Module):
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def node_module(analysis: Analysis, node: str) -> tuple[str, nn.Module] | None:
    """(path, module) that a node is the call of, if it is one the model really has.

    The graph's module path of a functional call is the module whose forward made it
    (or nothing): only a path whose module is the one the tracer recorded for the node
    is the node's own module.
    """
    path = node_record(analysis.traced.graph, node).module
    if not path:
        return None
    module = module_at(analysis, str(path))
    if module is None:
        return None
    recorded = analysis.traced.modules.get(str(path))
    if recorded is not None and recorded is not module:
        return None
    return str(path), module


def sequential_slot(analysis: Analysis, path: str) -> tuple[str, str] | None:
    """(parent path, child name) when ``path`` is a direct child of an ``nn.Sequential``."""
    parent, _, child = path.rpartition(".")
    holder = module_at(analysis, parent)
    if isinstance(holder, nn.Sequential) and child in holder._modules:
        return parent, child
    return None


def _calls(analysis: Analysis, path: str) -> list[str]:
    graph = analysis.traced.graph
    return [n for n in graph.nodes if node_record(graph, n).module == path]


def swap_action(analysis: Analysis, nodes: Sequence[str], to: str = "ReLU",
                ) -> dict[str, Any] | None:
    """Replace each saturating activation module with ``to``; None if any is functional.

    A module also called where the swap was not verified (a shared ``nn.Tanh`` used as
    the output squashing too) would change more than was verified: None as well.
    """
    modules: list[str] = []
    classes: set[str] = set()
    for node in nodes:
        found = node_module(analysis, node)
        name = node_record(analysis.traced.graph, node).key.split(":", 1)[-1]
        cls = SWAPPABLE.get(name)
        if found is None or cls is None or type(found[1]) is not cls:
            return None
        if not set(_calls(analysis, found[0])) <= set(nodes):
            return None
        if found[0] not in modules:
            modules.append(found[0])
        classes.add(cls.__name__)
    if not modules:
        return None
    return {"op": "swap_activation", "from": sorted(classes), "to": to, "modules": modules}


def weight_modules(analysis: Analysis, nodes: Sequence[str], need_bias: bool = False,
                   ) -> list[str] | None:
    """Module paths of weight layers whose weight (and bias) are the tensors the fix changed."""
    modules: list[str] = []
    for node in nodes:
        found = node_module(analysis, node)
        w, b = weight_and_bias(analysis.traced, node)
        if found is None or not isinstance(found[1], _WEIGHT_CLASSES) or w is None:
            return None
        module = found[1]
        if module.weight is not w or (b is not None and module.bias is not b) \
                or (need_bias and b is None):
            return None
        key = node_record(analysis.traced.graph, node).key
        if fan_in(key, w) != math.prod(w.shape[1:]):
            return None
        if found[0] not in modules:
            modules.append(found[0])
    return modules or None


def init_action(analysis: Analysis, nodes: Sequence[str], gain_sq: float,
                zero_bias: bool = True) -> dict[str, Any] | None:
    """Weights drawn N(0, gain_sq / fan_in), biases zeroed: ``variants.reinitialise``."""
    modules = weight_modules(analysis, nodes)
    if modules is None:
        return None
    return {"op": "init", "std_gain_sq": gain_sq, "zero_bias": zero_bias, "modules": modules}


def zero_bias_action(analysis: Analysis, nodes: Sequence[str]) -> dict[str, Any] | None:
    modules = weight_modules(analysis, nodes, need_bias=True)
    return None if modules is None else {"op": "zero_bias", "modules": modules}


def residual_action(analysis: Analysis, spans: Sequence[tuple[str, str, tuple[str, str]]],
                    alpha: float) -> dict[str, Any] | None:
    """Wrap each span's consecutive ``nn.Sequential`` children in ``x + alpha * block(x)``.

    The verified add reads the first layer's input and the node that feeds the next
    block (the span's last activation): the children from the first layer through the
    module of that node, when both are children of the same ``nn.Sequential``, are
    exactly what the add goes around.
    """
    out: list[list[str]] = []
    for _start, end, (first, _last) in spans:
        first_slot = sequential_slot(analysis, first)
        end_found = node_module(analysis, end)
        if first_slot is None or end_found is None:
            return None
        end_slot = sequential_slot(analysis, end_found[0])
        if end_slot is None or end_slot[0] != first_slot[0]:
            return None
        holder = module_at(analysis, first_slot[0])
        assert holder is not None
        keys = list(holder._modules)
        if keys.index(first_slot[1]) > keys.index(end_slot[1]):
            return None
        out.append([first, end_found[0]])
    return {"op": "residual", "scale": alpha, "spans": out} if out else None


def norm_action(analysis: Analysis, nodes: Sequence[str], kind: str) -> dict[str, Any] | None:
    """A normalisation right after each weight layer, by wrapping the ``nn.Sequential`` child.

    ``layer_norm`` normalises the last dimension; ``batch_norm`` dimension 1 (channels),
    as :meth:`~gradscope.rules.variants.Variant.insert_norm` does, hence the class by the
    output's rank.
    """
    modules, norms, features = [], [], []
    for node in nodes:
        found = node_module(analysis, node)
        shape = node_record(analysis.traced.graph, node).shape
        if found is None or not shape or sequential_slot(analysis, found[0]) is None \
                or len(_calls(analysis, found[0])) != 1:
            return None
        if kind == "layer_norm":
            norm, width = "LayerNorm", int(shape[-1])
        elif len(shape) in (2, 3, 4, 5):
            norm, width = f"BatchNorm{max(len(shape) - 2, 1)}d", int(shape[1])
        else:
            return None
        modules.append(found[0])
        norms.append(norm)
        features.append(width)
    if not modules:
        return None
    return {"op": "insert_norm", "modules": modules, "norms": norms, "features": features}


_POST_LN_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


def norm_first_action(analysis: Analysis, norms: Sequence[str]) -> dict[str, Any] | None:
    """``norm_first=True`` on PyTorch's Transformer layers, with a final LayerNorm per stack.

    Only when every Post-LN norm is a norm of an ``nn.TransformerEncoderLayer`` /
    ``DecoderLayer`` in an ``nn.TransformerEncoder`` / ``Decoder`` and every norm of those
    layers is one of them: then the flag moves each norm onto its sublayer's input and
    the stack's ``norm`` (added where missing) is the one after the last block, the
    verified Pre-LN. Hand-written blocks need their forward edited: None.
    """
    layers: list[str] = []
    seen_norms: set[str] = set()
    for node in norms:
        found = node_module(analysis, node)
        if found is None or not isinstance(found[1], nn.LayerNorm):
            return None
        parent = found[0].rpartition(".")[0]
        layer = module_at(analysis, parent)
        if not isinstance(layer, _POST_LN_LAYERS) or layer.norm_first:
            return None
        seen_norms.add(found[0])
        if parent not in layers:
            layers.append(parent)
    final: dict[str, int] = {}
    for path in layers:
        layer = module_at(analysis, path)
        own = {f"{path}.{name}" for name, m in layer.named_children()  # type: ignore[union-attr]
               if isinstance(m, nn.LayerNorm)}
        if not own <= seen_norms:
            return None
        stack_path = path.rpartition(".")[0].rpartition(".")[0]  # <stack>.layers.<i>
        stack = module_at(analysis, stack_path)
        if not isinstance(stack, _STACKS):
            return None
        if stack.norm is None:
            final[stack_path] = int(layer.norm1.normalized_shape[-1])  # type: ignore[union-attr, index]
    if not layers:
        return None
    return {"op": "norm_first", "modules": layers, "final_norm": final}


def recurrent_module_action(analysis: Analysis, op: str, path: str, module: nn.Module,
                            **params: Any) -> dict[str, Any] | None:
    """An action on one recurrent module (forget-gate bias, orthogonal recurrent weights).

    The fix was verified on ``module`` (the one the tracer recorded): the action names
    it only if the model's ``path`` is that very module.
    """
    if not isinstance(module, nn.RNNBase) or module_at(analysis, path) is not module:
        return None
    return {"op": op, "modules": [path], **params}
