"""Loading: a target string becomes a model and its example inputs (docs/contract.md section 1).

Targets are ``path/to/file.py``, ``path/to/file.py:NAME`` or
``package.module:NAME``. In a file without NAME the loader looks, in order,
for ``build_model()``, a module-level ``nn.Module`` named ``model``, and a
single no-argument ``nn.Module`` subclass defined in the file. Inputs come
from ``--input-shape``/``--dtype``, then ``example_inputs()``, then the first
batch of ``example_batches()``, then (with a note in the report) a shape inferred
from the first layer. ``example_batches()`` (real (inputs, target) pairs) and
``loss_fn`` are picked up for the probe and the learning-rate range test.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from gradscope.errors import InputError, NoModelError, TargetError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

#: Default batch size when a shape has to be inferred.
INFERRED_BATCH = 8


@dataclass
class LoadedTarget:
    """A model ready for analysis, and where it and its inputs came from."""

    name: str
    model: nn.Module
    inputs: tuple[Any, ...]
    source: str | None = None
    module: ModuleType | None = None
    notes: list[str] = field(default_factory=list)
    #: ``loss_fn(output, inputs)`` defined in the model file, for the probe, or
    #: ``loss_fn(output, inputs, target)`` when the file gives ``example_batches()``.
    loss_fn: Any = None
    #: ``example_batches()`` of the file: (inputs tuple, target) pairs of real data.
    batches: list[tuple[tuple[Any, ...], Any]] | None = None
    #: Whether the inputs are made up (``--input-shape``, inferred from the first layer)
    #: rather than the file's own data: no learning-rate range test runs on them.
    synthetic_inputs: bool = False
    #: With ``meta=True``: declared init moments of the meta weights, by ``id``.
    declared: dict[int, tuple[float, float]] = field(default_factory=dict)


def split_target(target: str) -> tuple[str, str | None]:
    """``file.py:NAME`` -> (``file.py``, ``NAME``); a Windows drive letter is not a NAME."""
    if ":" in target:
        head, _, tail = target.rpartition(":")
        if tail and not tail.startswith(("\\", "/")) and head:
            return head, tail
    return target, None


def _short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def import_file(path: Path) -> ModuleType:
    """Import a model file as a uniquely named module, with its folder on sys.path."""
    if not path.exists():
        raise TargetError(f"no such file: {path}", "check the path to the model file")
    if path.is_dir():
        raise TargetError(f"{path} is a directory", "name a .py file, optionally with :NAME")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    mod_name = f"gradscope_target_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path}", "is it a Python file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    folder = str(resolved.parent)
    inserted = folder not in sys.path
    if inserted:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(mod_name, None)
        raise TargetError(f"syntax error in {path}:{exc.lineno}: {exc.msg}",
                          "fix the model file") from exc
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        where = _user_line(exc, str(resolved))
        raise TargetError(f"importing {path} failed{where}: {_short_error(exc)}",
                          "fix the model file or install what it imports") from exc
    except BaseException:
        if inserted and folder in sys.path:
            sys.path.remove(folder)
        raise
    # The folder stays on sys.path: build_model(), example_inputs() and forward may
    # import sibling modules lazily, after the file itself has run.
    return module


def _user_line(exc: BaseException, filename: str) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename:
            return f" at line {frame.lineno}"
    return ""


def _constructible(cls: type) -> bool:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or
               p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())


def call_factory(obj: Any, label: str) -> nn.Module:
    try:
        made = obj()
    except Exception as exc:
        raise TargetError(f"{label} raised {_short_error(exc)}",
                          "fix the factory, or pass another target as file.py:NAME") from exc
    if not isinstance(made, nn.Module):
        raise TargetError(f"{label} returned {type(made).__name__}, not an nn.Module",
                          "return the model from the factory")
    return made


def resolve_model(module: ModuleType, name: str | None, where: str) -> tuple[nn.Module, str]:
    """Find the model in an imported module; returns (model, display name)."""
    if name is not None:
        if not hasattr(module, name):
            found = sorted(n for n, v in vars(module).items()
                           if isinstance(v, nn.Module) or (inspect.isclass(v) and
                                                           issubclass(v, nn.Module)))
            raise TargetError(f"{where} has no attribute {name!r}",
                              f"models found: {', '.join(found) or 'none'}")
        obj = getattr(module, name)
        if isinstance(obj, nn.Module):
            return obj, name
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            return call_factory(obj, f"{name}()"), name
        if callable(obj):
            return call_factory(obj, f"{name}()"), name
        raise TargetError(f"{where}:{name} is a {type(obj).__name__}, not a model",
                          "NAME must be an nn.Module instance, class or zero-argument factory")
    factory = getattr(module, "build_model", None)
    if callable(factory):
        model = call_factory(factory, "build_model()")
        return model, type(model).__name__
    instance = getattr(module, "model", None)
    if isinstance(instance, nn.Module):
        return instance, "model"
    classes = [v for v in vars(module).values()
               if inspect.isclass(v) and issubclass(v, nn.Module)
               and v.__module__ == module.__name__]
    usable = [c for c in classes if _constructible(c)]
    if len(usable) == 1:
        return call_factory(usable[0], f"{usable[0].__name__}()"), usable[0].__name__
    if len(usable) > 1:
        names = ", ".join(sorted(c.__name__ for c in usable))
        raise TargetError(f"{where} defines several models: {names}",
                          f"choose one as {where}:NAME")
    listed = ", ".join(sorted(c.__name__ for c in classes))
    what = f"nn.Module classes that need arguments: {listed}" if classes else \
        "no build_model(), no module-level `model`, no nn.Module subclass"
    raise NoModelError(f"no model found in {where} ({what})",
                       "define build_model() or name one as file.py:NAME")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` or ``"8x3x32x32"`` -> ``(8, 3, 32, 32)``; every size a positive integer.

    A part that is empty or not a number (``"4,x"``, ``"4,,16"``) is an error, never
    silently dropped: a shape with a dimension missing would fail later with a confusing
    message from the model, or worse, run.
    """
    parts = [part.strip() for part in text.strip().replace("x", ",").split(",")]
    try:
        dims = tuple(int(part) for part in parts)
    except ValueError:
        raise InputError(f"bad --input-shape {text!r}", "write sizes like 8,3,32,32") from None
    if not dims or any(d < 1 for d in dims):
        raise InputError(f"bad --input-shape {text!r}",
                         "write positive sizes like 8,3,32,32")
    return dims


def parse_dtype(text: str) -> torch.dtype:
    dtype = DTYPES.get(text.lower().replace("torch.", ""))
    if dtype is None:
        raise InputError(f"unknown --dtype {text!r}", f"choose one of {', '.join(DTYPES)}")
    return dtype


def _integer_high(model: nn.Module) -> int:
    """Token ids must index every embedding: stay below the smallest vocabulary."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else 2


def make_inputs(model: nn.Module, shapes: list[str], dtypes: list[str], seed: int = 0,
                ) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs from ``--input-shape`` (and ``--dtype``, one or one per input)."""
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise InputError(f"{len(dtypes)} --dtype values for {len(shapes)} inputs",
                         "give one --dtype for all inputs or one per --input-shape")
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for i, text in enumerate(shapes):
        shape = parse_shape(text)
        dtype = parse_dtype(dtypes[i] if len(dtypes) > 1 else dtypes[0]) if dtypes \
            else torch.float32
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            inputs.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            inputs.append(torch.randint(0, _integer_high(model), shape, generator=generator
                                        ).to(dtype))
    return tuple(inputs)


def as_input_tuple(value: Any, where: str) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value:
        return tuple(value)
    raise InputError(f"{where} returned {type(value).__name__}",
                     "return a tensor or a tuple of tensors")


def _call_data_hook(hook: Callable[[], Any], name: str) -> Any:
    """A model file's ``example_inputs()`` / ``example_batches()``, its failure one line."""
    try:
        return hook()
    except Exception as exc:
        raise InputError(f"{name}() raised {_short_error(exc)}",
                         f"fix {name}() or pass --input-shape") from exc


def as_batches(value: Any, where: str,
               hint: str = "return a list of (inputs, target) pairs, e.g. [(x0, y0), (x1, y1)]",
               ) -> list[tuple[tuple[Any, ...], Any]]:
    """``example_batches()``'s value as (inputs tuple, target) pairs, or a one-line error.

    Each batch is a pair ``(inputs, target)``, ``inputs`` a tensor or a tuple of
    tensors as ``example_inputs()`` returns; the target is handed to
    ``loss_fn(output, inputs, target)`` as it is. The API's ``example_batches=`` is
    checked here too, with its own ``hint``.
    """
    if isinstance(value, (str, bytes, torch.Tensor)) or not hasattr(value, "__iter__"):
        raise InputError(f"{where} gave {type(value).__name__}, not a list of batches", hint)
    batches = []
    for i, item in enumerate(value):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"{where}: batch {i} is not an (inputs, target) pair", hint)
        batches.append((as_input_tuple(item[0], f"{where}: batch {i}'s inputs"), item[1]))
    if not batches:
        raise InputError(f"{where} gave no batch", hint)
    return batches


def infer_inputs(model: nn.Module) -> tuple[tuple[torch.Tensor, ...], str] | None:
    """A guess from the first layer, for models that come with no inputs at all."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            shape: tuple[int, ...] = (INFERRED_BATCH, 32)
            ids = torch.randint(0, module.num_embeddings, shape, generator=generator)
            return (ids,), f"token ids of shape {list(shape)} (first layer: Embedding)"
        if isinstance(module, nn.Linear):
            shape = (INFERRED_BATCH, module.in_features)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]  # type: ignore
            shape = (INFERRED_BATCH, module.in_channels) + (32,) * spatial
        elif isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
            shape = (INFERRED_BATCH, 16, module.input_size) if module.batch_first else \
                (16, INFERRED_BATCH, module.input_size)
        else:
            continue
        return (torch.randn(shape, generator=generator),), \
            f"shape {list(shape)} inferred from the first layer ({type(module).__name__})"
    return None


def _with_dtypes(inputs: tuple[Any, ...], dtypes: list[str] | None) -> tuple[Any, ...]:
    """``--dtype`` without ``--input-shape``: cast the floating inputs (one or one per input)."""
    if not dtypes:
        return inputs
    if len(dtypes) not in (1, len(inputs)):
        raise InputError(f"{len(dtypes)} --dtype values for {len(inputs)} inputs",
                         "give one --dtype for all inputs or one per input")
    parsed = [parse_dtype(d) for d in dtypes]
    return tuple(t.to(parsed[i] if len(parsed) > 1 else parsed[0])
                 if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for i, t in enumerate(inputs))


def load_target(target: str, input_shapes: list[str] | None = None,
                dtypes: list[str] | None = None, meta: bool = False,
                values: bool = False) -> LoadedTarget:
    """Resolve a CLI target to a model and inputs, or raise a one-line error.

    ``meta=True`` builds the model under ``torch.device("meta")`` (no weight is
    allocated) and records how each weight was initialised (gradscope.meta);
    ``values=True`` also what ``--stream`` needs to materialise them later.
    Inputs are still made on the CPU: the estimate needs their statistics.
    """
    head, name = split_target(target)
    if head.endswith(".py") or Path(head).suffix == ".py" or "/" in head or "\\" in head:
        path = Path(head)
        module = import_file(path)
        where = str(path)
        source: str | None = str(path.resolve())
    else:
        try:
            module = importlib.import_module(head)
        except Exception as exc:
            raise TargetError(f"cannot import module {head!r}: {_short_error(exc)}",
                              "pass a file path, or install/put the package on PYTHONPATH"
                              ) from exc
        where = head
        source = getattr(module, "__file__", None)
    declared: dict[int, tuple[float, float]] = {}
    if meta:
        from gradscope.meta import library_init, recording_init

        with recording_init(declared, values=values):
            model, display = resolve_model(module, name, where)
            library_init(model)
    else:
        model, display = resolve_model(module, name, where)
    stem = Path(head).stem if source and head.endswith(".py") else head.rsplit(".", 1)[-1]
    if name is None and display != stem:
        display = f"{stem} ({display})"  # "deep_mlp (Sequential)" says more than "Sequential"
    loss_fn = getattr(module, "loss_fn", None)
    loaded = LoadedTarget(name=display, model=model, inputs=(), source=source, module=module,
                          declared=declared, loss_fn=loss_fn if callable(loss_fn) else None)
    batcher = getattr(module, "example_batches", None)
    if input_shapes:
        loaded.inputs = make_inputs(model, list(input_shapes), list(dtypes or []))
        loaded.synthetic_inputs = True
        if callable(batcher):
            loaded.notes.append("--input-shape given: example_batches() of the file was not "
                                "used (the probe ran on seeded synthetic batches)")
        return loaded
    if callable(batcher):
        loaded.batches = [(_with_dtypes(x, dtypes), y) for x, y in
                          as_batches(_call_data_hook(batcher, "example_batches"),
                                     "example_batches()")]
    factory = getattr(module, "example_inputs", None)
    if callable(factory):
        loaded.inputs = _with_dtypes(
            as_input_tuple(_call_data_hook(factory, "example_inputs"), "example_inputs()"),
            dtypes)
        return loaded
    if loaded.batches:  # the first real batch stands for the example inputs
        loaded.inputs = loaded.batches[0][0]
        return loaded
    guessed = infer_inputs(model)
    if guessed is None:
        raise InputError(
            f"no example inputs for {where}",
            "pass --input-shape 8,3,32,32 (one per positional input) or define "
            "example_inputs() in the file")
    loaded.inputs, how = guessed
    loaded.inputs = _with_dtypes(loaded.inputs, dtypes)
    loaded.synthetic_inputs = True
    loaded.notes.append(f"example inputs were not given: using {how}; pass --input-shape to "
                        "choose them")
    return loaded
