"""Building models on the meta device, remembering how their weights were initialised.

``--meta`` builds the model under ``torch.device("meta")``: no weight is ever
allocated, so a 70B-parameter architecture is analysed in a few hundred MB.
Meta tensors have no values, so the estimator needs each weight's declared
distribution instead of its measured one. While the model is built, every
initialisation call is watched: the in-place samplers that ``nn.init`` and
modules' ``reset_parameters`` end in (``uniform_``, ``normal_``, ``fill_``,
``zero_``) and every ``torch.nn.init`` function, read by its documented
formula (most dispatch through ``__torch_function__``; ``trunc_normal_`` and
``orthogonal_`` skip meta tensors silently and are wrapped while building).
The last call on a tensor wins, as it would for real values. Weights
initialised some other way fall back to the module's documented default in
the estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: (mean, second moment) of a tensor's declared distribution, by ``id(tensor)``.
Declared = dict[int, tuple[float, float]]


def _uniform(a: float = 0.0, b: float = 1.0) -> tuple[float, float]:
    mean = (a + b) / 2.0
    return mean, (b - a) ** 2 / 12.0 + mean * mean


def _normal(mean: float = 0.0, std: float = 1.0) -> tuple[float, float]:
    return mean, std * std + mean * mean


def _truncated_normal(mean: float, std: float, a: float, b: float) -> tuple[float, float]:
    """Moments of N(mean, std^2) truncated to [a, b]."""
    if std <= 0:
        return mean, mean * mean
    alpha, beta = (a - mean) / std, (b - mean) / std

    def pdf(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    z = max(cdf(beta) - cdf(alpha), 1e-300)
    m = mean + std * (pdf(alpha) - pdf(beta)) / z
    a_term = alpha * pdf(alpha) if math.isfinite(alpha) else 0.0
    b_term = beta * pdf(beta) if math.isfinite(beta) else 0.0
    var = std * std * (1 + (a_term - b_term) / z - ((pdf(alpha) - pdf(beta)) / z) ** 2)
    return m, max(var, 0.0) + m * m


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str,
         default: float) -> float:
    if name in kwargs:
        return float(kwargs[name])
    if len(args) > index and isinstance(args[index], (int, float)):
        return float(args[index])
    return default


class _InitRecorder(TorchFunctionMode):
    """Sees the in-place samplers every initialiser ends in."""

    def __init__(self, declared: Declared) -> None:
        super().__init__()
        self.declared = declared
        self.keep: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        # nn.init functions dispatch with the tensor as a keyword argument.
        target = args[0] if args and isinstance(args[0], torch.Tensor) else \
            kwargs.get("tensor")
        if not isinstance(target, torch.Tensor):
            target = None
        if target is None:
            return out
        moments: tuple[float, float] | None = None
        if getattr(func, "__module__", "") == "torch.nn.init":
            moments = _init_function_moments(name, target, args, kwargs)
        elif name == "uniform_":
            moments = _uniform(_arg(args, kwargs, 1, "from", 0.0), _arg(args, kwargs, 2, "to", 1.0))
        elif name == "normal_":
            moments = _normal(_arg(args, kwargs, 1, "mean", 0.0), _arg(args, kwargs, 2, "std", 1.0))
        elif name == "fill_":
            value = _arg(args, kwargs, 1, "value", 0.0)
            moments = (value, value * value)
        elif name == "zero_":
            moments = (0.0, 0.0)
        if moments is not None:
            self.record(target, moments)
        return out

    def record(self, tensor: torch.Tensor, moments: tuple[float, float]) -> None:
        self.declared[id(tensor)] = moments
        self.keep.append(tensor)  # ids stay unique while the model is built


def _fan(tensor: torch.Tensor, mode: str) -> int:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _init_function_moments(name: str, tensor: torch.Tensor, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> tuple[float, float] | None:
    """Moments declared by a ``torch.nn.init`` call, from its documented formula.

    ``nn.init`` functions dispatch through ``__torch_function__`` themselves, and
    the recorder does not see the samplers they call inside, so each one is
    read here.
    """
    def get(index: int, key: str, default: Any) -> Any:
        if key in kwargs:
            return kwargs[key]
        return args[index] if len(args) > index else default

    if name == "uniform_":
        return _uniform(float(get(1, "a", 0.0)), float(get(2, "b", 1.0)))
    if name == "normal_":
        return _normal(float(get(1, "mean", 0.0)), float(get(2, "std", 1.0)))
    if name == "trunc_normal_":
        return _truncated_normal(float(get(1, "mean", 0.0)), float(get(2, "std", 1.0)),
                                 float(get(3, "a", -2.0)), float(get(4, "b", 2.0)))
    if name == "constant_":
        value = float(get(1, "val", 0.0))
        return value, value * value
    if name == "zeros_":
        return 0.0, 0.0
    if name == "ones_":
        return 1.0, 1.0
    if name in ("eye_", "dirac_"):
        share = min(tensor.shape[0], tensor.shape[1] if tensor.dim() > 1 else 1) / \
            max(tensor.numel(), 1)
        return share, share
    if name in ("xavier_uniform_", "xavier_normal_"):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
        gain = float(get(1, "gain", 1.0))
        return 0.0, gain * gain * 2.0 / max(fan_in + fan_out, 1)
    if name in ("kaiming_uniform_", "kaiming_normal_"):
        a = float(get(1, "a", 0.0))
        mode = str(get(2, "mode", "fan_in"))
        nonlinearity = str(get(3, "nonlinearity", "leaky_relu"))
        gain = nn.init.calculate_gain(nonlinearity, a)  # type: ignore[arg-type]
        return 0.0, gain * gain / max(_fan(tensor, mode), 1)
    if name == "orthogonal_":
        return _orthogonal_moments(tensor, float(get(1, "gain", 1.0)))
    if name == "sparse_":
        sparsity = float(get(1, "sparsity", 0.1))
        std = float(get(2, "std", 0.01))
        return 0.0, (1.0 - sparsity) * std * std
    return None


def _orthogonal_moments(tensor: torch.Tensor, gain: float = 1.0, *args: Any,
                        **kwargs: Any) -> tuple[float, float]:
    rows = tensor.shape[0] if tensor.dim() else 1
    cols = tensor.numel() // max(rows, 1)
    return 0.0, gain * gain / max(rows, cols, 1)


@contextmanager
def recording_init(declared: Declared, device: str = "meta") -> Iterator[None]:
    """Build under ``torch.device(device)`` and record declared init moments into ``declared``."""
    recorder = _InitRecorder(declared)
    # On meta tensors these two return before sampling anything (nothing for the
    # recorder to see), so they are wrapped for the duration of the build.
    originals: dict[str, Callable[..., Any]] = {
        "trunc_normal_": nn.init.trunc_normal_, "orthogonal_": nn.init.orthogonal_}
    nn.init.trunc_normal_ = _recorded(originals["trunc_normal_"], recorder)
    nn.init.orthogonal_ = _recorded(originals["orthogonal_"], recorder)
    try:
        with torch.device(device), recorder:
            yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


def _recorded(original: Callable[..., Any], recorder: _InitRecorder) -> Callable[..., Any]:
    """``original`` that also records its declared moments (see ``recording_init``)."""
    name = original.__name__

    def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(tensor, *args, **kwargs)
        moments = _init_function_moments(name, tensor, (tensor, *args), kwargs)
        if moments is not None:
            recorder.record(tensor, moments)
        return result

    return wrapper


def declared_by_name(model: nn.Module, declared: Declared) -> dict[str, tuple[float, float]]:
    """Declared moments keyed by parameter/buffer name (ids are only valid while alive)."""
    named: dict[str, tuple[float, float]] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in declared:
            named[name] = declared[id(tensor)]
    return named


def is_meta_model(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


def library_init(model: nn.Module) -> None:
    """Run a library's own weight initialisation that it skips on the meta device.

    Hugging Face models initialise through ``_init_weights`` (normal(0, 0.02) for linear
    and embedding weights, ones for norms, zeros for biases), but transformers skips it
    when the model is built on meta, leaving PyTorch's module defaults: the estimate
    then saw 14x the real weights' spread on Llama-like models. Called inside
    :func:`recording_init`, each initialisation it performs is recorded as declared.
    """
    init = getattr(model, "_init_weights", None)
    if callable(init) and is_meta_model(model):
        model.apply(init)
