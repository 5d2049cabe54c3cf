"""Resource limits: a memory check before the model is built, moved or probed, and the
probe's deadline (``--timeout``).

Why a memory check: running out of memory midway is the worst way to fail. On
the CPU the kernel's OOM killer ends the process with no message at all (a CI
job just dies), and on a GPU the out-of-memory error names neither the model's
size nor ``--meta``, which analyses a model of any size without allocating it.
So before weights are built or moved, and before the probe allocates a gradient
per trainable parameter, the bytes needed are compared with the bytes free.

The estimate is deliberately a lower bound (weights moved to the device plus
one gradient per trainable parameter; activations are not guessed): a check
that refuses models which would have fitted is worse than none, and the probe
already halves the batch on an out-of-memory error for the activations.

Why a deadline: a CI step needs a bound on its run time. The probe checks it
between graph nodes and between batches, and stops with what it has (see
:class:`Deadline` and ``gradscope.probe.run_probe``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradscope.errors import ConfigError, ResourceError

GB = 1024 ** 3
_MEMINFO = Path("/proc/meminfo")
#: cgroup v2 files of the current container: its limit and its current use.
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Footprint:
    """Bytes a model holds: all its weights, and the gradients the probe will allocate."""

    weights: int
    gradients: int
    #: The model counted, when it was built on the meta device for the count (the memory
    #: check's hint works out from it what --stream would need).
    model: nn.Module | None = field(default=None, compare=False, repr=False)


def footprint(model: nn.Module) -> Footprint:
    """Parameter and buffer bytes (shared tensors once), and trainable-parameter bytes.

    ``numel * element_size`` works on meta tensors too, so a model built on the
    meta device is counted without allocating anything.
    """
    params = list(dict.fromkeys(model.parameters()))
    buffers = list(dict.fromkeys(model.buffers()))
    weights = sum(t.numel() * t.element_size() for t in (*params, *buffers))
    gradients = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return Footprint(weights=weights, gradients=gradients)


def factory_footprint(factory: Callable[[], nn.Module]) -> Footprint | None:
    """Count what ``factory()`` would allocate by building it on the meta device first.

    Cheap (meta tensors hold no data, so no init runs for real), and it turns an
    OOM kill during the real build into a clear error. Any failure (a factory that
    loads a checkpoint or calls ``.cuda()``) just means "unknown": the real build
    then goes ahead unchecked. The CPU RNG state is put back so that the real
    build draws the same weights as without this check.
    """
    rng = torch.get_rng_state()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = factory()
    except Exception:  # noqa: BLE001 - unknown is fine: the real build is not checked
        return None
    finally:
        torch.set_rng_state(rng)
    if not isinstance(model, nn.Module):
        return None
    counted = footprint(model)
    return Footprint(counted.weights, counted.gradients, model)


def _cpu_available() -> int | None:
    """Bytes the CPU can still allocate: psutil when installed, else /proc/meminfo,
    capped by the container's cgroup v2 limit (which /proc/meminfo does not show)."""
    free: int | None = None
    try:
        psutil = importlib.import_module("psutil")
        free = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional
        with contextlib.suppress(OSError, ValueError):
            for line in _MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024  # kB
                    break
    with contextlib.suppress(OSError, ValueError):
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            used = int((_CGROUP / "memory.current").read_text().strip())
            room = max(int(limit) - used, 0)
            free = room if free is None else min(free, room)
    return free


def available_bytes(device: str) -> int | None:
    """Bytes free for new allocations on ``device``; None when it cannot be told (mps)."""
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no figure, no check
            return None
    if kind == "cpu":
        return _cpu_available()
    return None


def _gb(n: int) -> str:
    return f"{n / GB:.3g} GB"


def check_memory(device: str, *, weights: int = 0, gradients: int = 0,
                 doing: str = "probe the model",
                 instead: Callable[[], str | None] | None = None) -> None:
    """Raise :class:`ResourceError` when ``weights + gradients`` bytes do not fit on ``device``.

    ``weights`` are the bytes about to be allocated or moved there (0 when the
    model already lives there), ``gradients`` those the probe will add. ``instead``:
    gives what the ways of probing a large model would need (``--stream``,
    ``--distributed``) for the hint, asked only when the model does not fit
    (``gradscope.streaming.memory_alternatives``).
    """
    need = weights + gradients
    if need <= 0:
        return
    free = available_bytes(device)
    if free is None or need <= free:
        return
    other = instead() if instead is not None else None
    parts = [f"{label} {_gb(n)}" for label, n in (("weights", weights),
                                                    ("gradients", gradients)) if n]
    raise ResourceError(
        f"not enough memory to {doing} on {device}: it needs about {_gb(need)} "
        f"({' + '.join(parts)}), only {_gb(free)} is available",
        (f"{other}; or use " if other else "use ")
        + "--meta for a static analysis that allocates nothing (or --no-probe, or "
        "--device with more memory)")


class Deadline:
    """The end of the time an analysis may take (``timeout`` seconds from its start).

    The clock starts when ``analyze`` is called, so tracing counts too; only the
    probe stops early, because its forward and backward are the part that grows
    with the model and can be cut at a node or batch boundary.
    """

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and (
                isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                or not math.isfinite(seconds) or seconds <= 0):
            raise ConfigError(f"timeout must be a positive number of seconds, not {seconds!r}",
                              "fix the setting")
        self.seconds = None if seconds is None else float(seconds)
        self._end = None if seconds is None else time.monotonic() + float(seconds)

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end
