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


#: Attribute of a meta tensor holding the call that initialised it last, to replay on a
#: real tensor of the same shape: ``(function, arguments after the tensor, keywords)``.
RECIPE = "_gradscope_init"
#: Attribute of a small meta tensor holding its value computed on the CPU while the model
#: was built (``torch.ones`` norm weights, rotary ``inv_freq`` tables, masks).
SHADOW = "_gradscope_value"
#: Largest tensor (elements) whose value is computed alongside its meta twin: norms,
#: biases and buffers; weight matrices are always drawn by an init call instead.
SHADOW_LIMIT = 1 << 22

Recipe = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
#: Ops whose result is a copy of their tensor argument (``p.data``, ``clone``): it keeps
#: the argument's recipe.
_COPIES = frozenset({"__get__", "clone", "detach", "contiguous"})


class _InitRecorder(TorchFunctionMode):
    """Sees the in-place samplers every initialiser ends in.

    With ``values=True`` (``--stream``, which materialises the weights later) it also
    keeps, on each meta tensor, the last init call to replay (:data:`RECIPE`) and, for
    small tensors made from factories and Python values, their real value computed on
    the CPU alongside (:data:`SHADOW`): a meta tensor has neither.
    """

    def __init__(self, declared: Declared, values: bool = False) -> None:
        super().__init__()
        self.declared = declared
        self.values = values
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
        if self.values:
            _shadow(func, args, kwargs, out)
            if name in _COPIES and target is not None and hasattr(target, RECIPE) \
                    and isinstance(out, torch.Tensor) and out is not target \
                    and out.shape == target.shape:
                # ``copy.deepcopy`` of a layer (nn.TransformerEncoder's clones) makes its
                # parameters from ``p.data.clone()``: the copy is initialised as the original.
                setattr(out, RECIPE, getattr(target, RECIPE))
            if name in _COPIES:
                return out
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
            self.record(target, moments, (func, args, kwargs))
        return out

    def record(self, tensor: torch.Tensor, moments: tuple[float, float],
               call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> None:
        self.declared[id(tensor)] = moments
        self.keep.append(tensor)  # ids stay unique while the model is built
        if self.values and tensor.is_meta:
            func, args, kwargs = call
            rest = dict(kwargs)
            if rest.pop("tensor", None) is None:
                args = args[1:]
            setattr(tensor, RECIPE, (func, tuple(args), rest))
            if hasattr(tensor, SHADOW):  # the init call comes last: it decides the values
                delattr(tensor, SHADOW)


def _shadow(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """Compute a small meta result's value on the CPU, from its arguments' values.

    Factories (``torch.ones``, ``arange``) run again on the CPU; other ops run on the
    arguments' shadows when every meta argument has one; an in-place op on a tensor
    with a shadow updates the shadow. Anything else leaves no shadow: the tensor is
    then materialised from its init call, or not at all (``--stream`` says which).
    """
    from torch.utils._device import _device_constructors

    if not isinstance(out, torch.Tensor) or not out.is_meta or out.numel() > SHADOW_LIMIT:
        return
    if func in _device_constructors():
        try:
            with torch._C.DisableTorchFunction():
                value = func(*args, **{**kwargs, "device": "cpu"})
        except Exception:  # noqa: BLE001 - a value we cannot compute is simply not kept
            return
        setattr(out, SHADOW, value)
        return
    missing = False

    def real(value: Any) -> Any:
        nonlocal missing
        if isinstance(value, torch.Tensor) and value.is_meta:
            shadow = getattr(value, SHADOW, None)
            if shadow is None:
                missing = True
            return shadow
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(real(v) for v in value)
        return value

    real_args, real_kwargs = real(args), {k: real(v) for k, v in kwargs.items()}
    if missing or not any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
        return
    if "device" in real_kwargs:
        real_kwargs["device"] = "cpu"
    try:
        with torch._C.DisableTorchFunction():
            value = func(*real_args, **real_kwargs)
    except Exception:  # noqa: BLE001
        return
    if isinstance(value, torch.Tensor) and value.shape == out.shape:
        setattr(out, SHADOW, value)


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
def recording_init(declared: Declared, device: str = "meta",
                   values: bool = False) -> Iterator[None]:
    """Build under ``torch.device(device)`` and record declared init moments into ``declared``.

    ``values=True`` also keeps what :func:`gradscope.streaming` needs to materialise the
    weights later with the same initialisation (see :class:`_InitRecorder`).
    """
    recorder = _InitRecorder(declared, values)
    # On meta tensors these two return before sampling anything (nothing for the
    # recorder to see), so they are wrapped for the duration of the build.
    originals: dict[str, Callable[..., Any]] = {
        "trunc_normal_": nn.init.trunc_normal_, "orthogonal_": nn.init.orthogonal_}
    nn.init.trunc_normal_ = _recorded(originals["trunc_normal_"], recorder)
    nn.init.orthogonal_ = _recorded(originals["orthogonal_"], recorder)
    saved_new = nn.Parameter.__dict__["__new__"]
    new_parameter = nn.Parameter.__new__
    if values:
        # ``nn.Parameter(torch.ones(d))`` wraps the meta tensor in a new object: what was
        # kept on the tensor goes with it.
        def parameter(cls: Any, data: Any = None, requires_grad: bool = True) -> Any:
            made = new_parameter(cls, data, requires_grad)
            for attr in (RECIPE, SHADOW):
                if data is not None and hasattr(data, attr):
                    setattr(made, attr, getattr(data, attr))
            return made

        nn.Parameter.__new__ = staticmethod(parameter)  # type: ignore[assignment]
    try:
        with torch.device(device), recorder:
            yield
    finally:
        nn.Parameter.__new__ = saved_new  # type: ignore[method-assign]
        for name, original in originals.items():
            setattr(nn.init, name, original)


def _recorded(original: Callable[..., Any], recorder: _InitRecorder) -> Callable[..., Any]:
    """``original`` that also records its declared moments (see ``recording_init``)."""
    name = original.__name__

    def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(tensor, *args, **kwargs)
        moments = _init_function_moments(name, tensor, (tensor, *args), kwargs)
        if moments is not None:
            recorder.record(tensor, moments, (original, (tensor, *args), kwargs))
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
