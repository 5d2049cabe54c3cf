"""Choosing which tensor of a model's output the probe differentiates.

Models return tensors, tuples, dicts, dataclasses or Hugging Face
``ModelOutput`` objects. The gradient is measured from one floating tensor:
``logits`` when there is one (what a loss is computed on), else the first
floating tensor in order; ``--output KEY`` overrides. The choice is reported
as a path such as ``output["logits"]`` or ``output[0]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from gradscope.errors import OutputError

PREFERRED_KEYS = ("logits", "prediction_logits", "last_hidden_state", "out", "output")


def _items(value: Any) -> list[tuple[str, Any]] | None:
    """Children of a container with their path suffixes; None for a leaf."""
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__")
                                      and not isinstance(value, (list, tuple))):
        try:
            return [(f"[{k!r}]", value[k]) for k in list(value.keys())]
        except Exception:  # noqa: BLE001 - an object that only looks like a mapping
            return None
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, tuple):  # namedtuple
        return [(f".{k}", getattr(value, k)) for k in value._fields]  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    return None


def _lookup(value: Any, key: str) -> tuple[str, Any] | None:
    items = _items(value)
    if items is None:
        return None
    for suffix, child in items:
        if suffix in (f"[{key!r}]", f".{key}", f"[{key}]"):
            return suffix, child
    if key.isdigit() and isinstance(value, (list, tuple)) and int(key) < len(value):
        return f"[{key}]", value[int(key)]
    return None


def select_output(
    value: Any, key: str | None, is_float: Callable[[Any], bool], prefix: str = "output"
) -> tuple[Any, str]:
    """Pick the leaf to probe from ``value``; returns (leaf, path).

    ``is_float`` decides whether a leaf is a floating tensor; it is passed in so
    the same rule works on real tensors, fake tensors and fx nodes. ``key`` may
    be dotted (``hidden_states.0``) to reach into nested outputs.
    """
    if key is not None and key != "":
        current, path = value, prefix
        for part in key.split("."):
            found = _lookup(current, part)
            if found is None:
                raise OutputError(
                    f"model output has no entry {part!r} (asked for --output {key})",
                    f"available: {', '.join(describe_entries(current)) or 'none'}",
                )
            suffix, current = found
            path += suffix
        if _items(current) is not None:
            return select_output(current, None, is_float, path)
        if not is_float(current):
            raise OutputError(f"{path} is not a floating-point tensor", "choose another --output")
        return current, path
    if is_float(value):
        return value, prefix
    items = _items(value)
    if items is not None:
        for preferred in PREFERRED_KEYS:
            for suffix, child in items:
                if suffix in (f"[{preferred!r}]", f".{preferred}") and is_float(child):
                    return child, prefix + suffix
        for suffix, child in items:
            try:
                return select_output(child, None, is_float, prefix + suffix)
            except OutputError:
                continue
    raise OutputError(
        "the model's output holds no floating-point tensor to differentiate",
        "return the logits (or a float tensor) from forward, or choose one with --output",
    )


def describe_entries(value: Any) -> list[str]:
    items = _items(value)
    return [s.strip("[].'\"") for s, _ in items] if items else []
