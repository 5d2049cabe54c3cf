"""Apply a recommendation's machine-readable ``action`` to a model.

The report's fixes say what to change in words and in a snippet; where the change
is mechanical (module surgery or a re-initialisation), the recommendation's
``action`` says it as data, and :func:`apply` makes that change, so that a script
or a benchmark can apply what a report recommends without reading prose::

    report = gradscope.analyze(model, x)
    rec = report.findings[0].recommendations[0]
    model = gradscope.fixes.apply(model, rec)   # or a recommendation from report JSON

The actions and their parameters are listed in docs/contract.md. Each is the same
change the report verified on a copy of the graph (``gradscope.rules.actions`` builds
them only where that holds). Actions for the training loop (``clip_grad_norm``,
``warmup``, ``learning_rate``) are refused here: the loop reads their parameters.
Nothing in the analysis pipeline imports this module.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradscope.errors import FixError
from gradscope.records import Recommendation

__all__ = ["LOOP_OPS", "MODEL_OPS", "Residual", "action_of", "apply"]

#: Actions a training loop applies; ``apply`` refuses them.
LOOP_OPS = ("clip_grad_norm", "warmup", "learning_rate")

_NORMS: dict[str, type[nn.Module]] = {
    "LayerNorm": nn.LayerNorm, "BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
}
_ACTIVATIONS = ("ReLU", "Sigmoid", "Tanh", "Softsign", "Hardsigmoid", "Hardtanh", "LogSigmoid",
                "GELU", "SiLU", "LeakyReLU")


class Residual(nn.Module):
    """``x + scale * block(x)``: the identity skip the ``residual`` action wraps a span in."""

    def __init__(self, block: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.block = block
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.block(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


def action_of(recommendation: Recommendation | Mapping[str, Any]) -> dict[str, Any] | None:
    """The action of a recommendation, its JSON form, or an action given on its own."""
    if isinstance(recommendation, Recommendation):
        return recommendation.action
    if isinstance(recommendation, Mapping):
        if "op" in recommendation:
            return dict(recommendation)
        action = recommendation.get("action")
        return dict(action) if isinstance(action, Mapping) else None
    raise FixError(f"cannot apply a {type(recommendation).__name__}",
                   "pass a Recommendation, its to_dict() form or its action")


def apply(model: nn.Module, recommendation: Recommendation | Mapping[str, Any], *,
          seed: int = 0) -> nn.Module:
    """Make ``recommendation``'s change to ``model`` in place, and return the model.

    ``recommendation`` is a :class:`~gradscope.records.Recommendation`, its JSON form
    (``to_dict()``, or one read from a report file) or just its ``action``. Random
    draws (re-initialisation, orthogonal matrices) come from a generator seeded with
    ``seed``, so applying the same fix twice gives the same weights. The return value
    is the model (the same object; a caller that wants the original keeps a deep copy).
    Raises :class:`~gradscope.errors.FixError` for a recommendation without an action,
    a training-loop action, or a module the model does not have.
    """
    action = action_of(recommendation)
    if action is None:
        text = recommendation.text if isinstance(recommendation, Recommendation) \
            else str(recommendation.get("text", ""))
        raise FixError(f"this recommendation has no action to apply ({text[:80]!r})",
                       "it needs editing the model's source by hand: see its text and code")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return _apply(model, action, generator)


def _apply(model: nn.Module, action: Mapping[str, Any], gen: torch.Generator) -> nn.Module:
    op = action.get("op")
    if op in LOOP_OPS:
        raise FixError(f"the {op!r} action changes the training loop, not the model",
                       f"read its parameters ({_params(action)}) in the training loop")
    handler = _OPS.get(str(op))
    if handler is None:
        raise FixError(f"unknown action op {op!r}",
                       f"known ops: {', '.join(sorted([*_OPS, *LOOP_OPS]))}")
    return handler(model, action, gen)


def _params(action: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in action.items() if k != "op")


def _field(action: Mapping[str, Any], key: str) -> Any:
    if key not in action:
        raise FixError(f"the {action.get('op')!r} action has no {key!r}",
                       "pass the action as the report wrote it")
    return action[key]


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise FixError(f"module {path!r} does not exist in the model",
                       "apply the recommendation to the model it was made for: its "
                       "module names are the report's") from None


def _expect(module: nn.Module, path: str, classes: tuple[type[nn.Module], ...],
            what: str) -> None:
    if not isinstance(module, classes):
        raise FixError(f"module {path!r} is a {type(module).__name__}, not {what}",
                       "apply the recommendation to the model it was made for")


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path``; the new root when ``path`` is the model itself."""
    if not path:
        return new
    parent, _, child = path.rpartition(".")
    setattr(_module(model, parent), child, new)
    return model


def _sequence(model: nn.Module, action: Mapping[str, Any], gen: torch.Generator) -> nn.Module:
    for step in _field(action, "actions"):
        model = _apply(model, step, gen)
    return model


def _swap_activation(model: nn.Module, action: Mapping[str, Any],
                     gen: torch.Generator) -> nn.Module:
    to = str(_field(action, "to"))
    sources = tuple(str(c) for c in _field(action, "from"))
    if to not in _ACTIVATIONS or not set(sources) <= set(_ACTIVATIONS):
        raise FixError(f"cannot swap {list(sources)} for {to!r}",
                       f"activations known: {', '.join(_ACTIVATIONS)}")
    classes = tuple(getattr(nn, c) for c in sources)
    for path in _field(action, "modules"):
        _expect(_module(model, path), path, classes, " or ".join(sources))
    for path in _field(action, "modules"):
        model = _replace(model, path, getattr(nn, to)())
    return model


def _weight_layer(model: nn.Module, path: str) -> nn.Module:
    module = _module(model, path)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise FixError(f"module {path!r} ({type(module).__name__}) has no weight matrix",
                       "apply the recommendation to the model it was made for")
    return module


def _init(model: nn.Module, action: Mapping[str, Any], gen: torch.Generator) -> nn.Module:
    """Var W = std_gain_sq / fan_in with fan_in = prod(weight.shape[1:]), as verified."""
    gain_sq = float(_field(action, "std_gain_sq"))
    zero_bias = bool(action.get("zero_bias", True))
    layers = [_weight_layer(model, p) for p in _field(action, "modules")]
    for module in layers:
        w = module.weight
        assert isinstance(w, torch.Tensor)
        std = math.sqrt(gain_sq / max(math.prod(w.shape[1:]), 1))
        draw = torch.randn(w.shape, generator=gen, dtype=torch.float32) * std
        w.copy_(draw.to(w.dtype))
        bias = getattr(module, "bias", None)
        if zero_bias and isinstance(bias, torch.Tensor):
            bias.zero_()
    return model


def _zero_bias(model: nn.Module, action: Mapping[str, Any], gen: torch.Generator) -> nn.Module:
    for path in _field(action, "modules"):
        bias = getattr(_module(model, path), "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise FixError(f"module {path!r} has no bias", "nothing to zero there")
        bias.zero_()
    return model


def _lstm_forget_bias(model: nn.Module, action: Mapping[str, Any],
                      gen: torch.Generator) -> nn.Module:
    """bias_ih's forget slice to ``value``, bias_hh's to 0 (gate order i, f, g, o)."""
    value = float(_field(action, "value"))
    for path in _field(action, "modules"):
        lstm = _module(model, path)
        _expect(lstm, path, (nn.LSTM,), "an nn.LSTM")
        assert isinstance(lstm, nn.LSTM)
        if not lstm.bias:
            raise FixError(f"LSTM {path!r} has no biases", "build it with bias=True")
        hidden = int(lstm.hidden_size)
        for name, tensor in lstm.named_parameters():
            if name.startswith("bias_ih"):
                tensor[hidden:2 * hidden].fill_(value)
            elif name.startswith("bias_hh"):
                tensor[hidden:2 * hidden].zero_()
    return model


def _orthogonal_recurrent(model: nn.Module, action: Mapping[str, Any],
                          gen: torch.Generator) -> nn.Module:
    """One orthogonal block per gate of each ``weight_hh``, the QR draw the fix verified."""
    for path in _field(action, "modules"):
        rnn = _module(model, path)
        _expect(rnn, path, (nn.RNNBase,), "a recurrent layer (nn.RNN, nn.LSTM, nn.GRU)")
        for name, tensor in rnn.named_parameters():
            if not name.startswith("weight_hh"):
                continue
            size = tensor.shape[1]
            for k in range(tensor.shape[0] // size):
                block = tensor[k * size:(k + 1) * size]
                q, r = torch.linalg.qr(torch.randn(block.shape, generator=gen,
                                                   dtype=torch.float64))
                block.copy_((q * torch.sign(torch.diagonal(r))).to(block.dtype))
    return model


def _sequential_slot(model: nn.Module, path: str) -> tuple[nn.Sequential, str]:
    parent, _, child = path.rpartition(".")
    holder = _module(model, parent)
    _module(model, path)
    if not isinstance(holder, nn.Sequential):
        raise FixError(f"module {path!r} is not a child of an nn.Sequential",
                       "wrap it by hand, as the recommendation's code shows")
    return holder, child


def _insert_norm(model: nn.Module, action: Mapping[str, Any],
                 gen: torch.Generator) -> nn.Module:
    """Each layer becomes ``nn.Sequential(layer, norm)`` in its ``nn.Sequential`` slot."""
    paths, norms = _field(action, "modules"), _field(action, "norms")
    features = _field(action, "features")
    if not len(paths) == len(norms) == len(features):
        raise FixError("the insert_norm action's modules, norms and features differ in length",
                       "pass the action as the report wrote it")
    slots = [_sequential_slot(model, p) for p in paths]
    for (holder, child), norm, width in zip(slots, norms, features, strict=True):
        cls = _NORMS.get(str(norm))
        if cls is None:
            raise FixError(f"unknown normalisation {norm!r}", f"known: {', '.join(_NORMS)}")
        layer = holder._modules[child]
        assert layer is not None
        ref = next(layer.parameters(), None)
        made = cls(int(width), device=ref.device if ref is not None else None,
                   dtype=ref.dtype if ref is not None else None)
        holder._modules[child] = nn.Sequential(layer, made)
    return model


def _residual(model: nn.Module, action: Mapping[str, Any], gen: torch.Generator) -> nn.Module:
    """Children ``first`` .. ``last`` (inclusive) of one ``nn.Sequential`` -> one Residual.

    The wrapper takes the first child's name, so the names of the other children (and
    of later spans) stay what the report says.
    """
    scale = float(_field(action, "scale"))
    plans = []
    for first, last in _field(action, "spans"):
        holder, a = _sequential_slot(model, first)
        other, b = _sequential_slot(model, last)
        keys = list(holder._modules)
        if other is not holder or keys.index(a) > keys.index(b):
            raise FixError(f"span {first!r} .. {last!r} is not a run of consecutive children "
                           "of one nn.Sequential", "wrap it by hand")
        plans.append((holder, a, b))
    for holder, a, b in plans:
        keys = list(holder._modules)
        if a not in keys or b not in keys:
            raise FixError(f"spans overlap at {a!r} .. {b!r}", "pass the action as written")
        i, j = keys.index(a), keys.index(b)
        block = nn.Sequential(OrderedDict((k, holder._modules[k]) for k in keys[i:j + 1]))
        items = [(k, m) for k, m in holder._modules.items() if k not in keys[i + 1:j + 1]]
        holder._modules.clear()
        for k, m in items:
            holder._modules[k] = Residual(block, scale) if k == a else m
    return model


def _norm_first(model: nn.Module, action: Mapping[str, Any], gen: torch.Generator) -> nn.Module:
    """Pre-LN for PyTorch's Transformer layers, and a final LayerNorm on each stack."""
    layers = [(p, _module(model, p)) for p in _field(action, "modules")]
    for path, layer in layers:
        _expect(layer, path, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer),
                "an nn.TransformerEncoderLayer or nn.TransformerDecoderLayer")
    final = dict(action.get("final_norm") or {})
    for path in final:
        _expect(_module(model, path), path, (nn.TransformerEncoder, nn.TransformerDecoder),
                "an nn.TransformerEncoder or nn.TransformerDecoder")
    for _, layer in layers:
        setattr(layer, "norm_first", True)  # noqa: B010 - both layer classes read it in forward
    for path, width in final.items():
        stack = _module(model, path)
        if getattr(stack, "norm", None) is None:
            ref = next(stack.parameters(), None)
            stack.norm = nn.LayerNorm(int(width), device=ref.device if ref is not None else None,
                                      dtype=ref.dtype if ref is not None else None)
    return model


_OPS: dict[str, Callable[[nn.Module, Mapping[str, Any], torch.Generator], nn.Module]] = {
    "sequence": _sequence,
    "swap_activation": _swap_activation,
    "init": _init,
    "zero_bias": _zero_bias,
    "lstm_forget_bias": _lstm_forget_bias,
    "orthogonal_recurrent": _orthogonal_recurrent,
    "insert_norm": _insert_norm,
    "residual": _residual,
    "norm_first": _norm_first,
}

#: Actions :func:`apply` makes to a model.
MODEL_OPS = tuple(_OPS)
