"""What the framework callbacks share: the real torch optimizer, steps whose gradients a
closure computes, and the report files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

#: The report formats a callback writes, and their file name: ``gradscope-watch.<ext>``.
FORMATS = ("html", "json")
STEM = "gradscope-watch"


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that really steps, under the wrappers of the frameworks.

    accelerate's ``AcceleratedOptimizer`` (what the Hugging Face ``Trainer`` steps) is a
    ``torch.optim.Optimizer`` subclass whose ``step`` calls ``.optimizer.step()``: step
    hooks on the wrapper never run. Lightning's ``LightningOptimizer`` keeps it as
    ``._optimizer``. Unwrapped until an optimizer without such an inner one is reached.
    """
    seen: set[int] = set()
    current = optimizer
    while id(current) not in seen:
        seen.add(id(current))
        inner = None
        for attr in ("optimizer", "_optimizer"):
            candidate = getattr(current, attr, None)
            if isinstance(candidate, torch.optim.Optimizer) and candidate is not current:
                inner = candidate
                break
        if inner is None:
            break
        current = inner
    if not isinstance(current, torch.optim.Optimizer):
        raise TypeError(f"gradscope.watch needs a torch optimizer; {type(optimizer).__name__} "
                        "is not one and wraps none")
    return current


class _Handle:
    def __init__(self, hooks: dict[int, Any], key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


class AfterClosure:
    """The optimizer as the watch's step hooks see it when a closure computes the gradients.

    Lightning (like LBFGS) calls ``optimizer.step(closure)``, and the closure runs the
    forward and backward of the step *inside* the step, after torch's step pre-hooks. A
    pre-hook registered here runs when the step's closure has first returned (the step's
    gradients then exist, the weights are not updated yet); a step without a closure runs
    it as torch would. Post-hooks go straight to the optimizer. Only the two methods and
    ``param_groups`` the watch uses are offered.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._pre_hooks: dict[int, Callable[[Any, Any, Any], None]] = {}
        self._next = 0
        self._handle: Any = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def register_step_pre_hook(self, hook: Callable[[Any, Any, Any], None]) -> _Handle:
        self._next += 1
        self._pre_hooks[self._next] = hook
        if self._handle is None:
            self._handle = self.optimizer.register_step_pre_hook(self._pre_step)
        return _Handle(self._pre_hooks, self._next)

    def register_step_post_hook(self, hook: Callable[[Any, Any, Any], None]) -> Any:
        return self.optimizer.register_step_post_hook(hook)

    def remove(self) -> None:
        """Remove the one torch pre-hook this adapter holds (after the watch closed)."""
        self._pre_hooks.clear()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _run(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for hook in list(self._pre_hooks.values()):
            hook(optimizer, args, kwargs)

    def _pre_step(self, optimizer: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        # args[0] is the optimizer itself (torch's wrapper passes the bound call's args)
        closure = kwargs.get("closure")
        positional = closure is None and len(args) > 1 and callable(args[1])
        if positional:
            closure = args[1]
        if closure is None or not self._pre_hooks:
            self._run(optimizer, args, kwargs)
            return None
        fired = False

        def after_closure() -> Any:
            nonlocal fired
            result = closure()
            if not fired:
                fired = True
                self._run(optimizer, args, kwargs)
            return result

        if positional:
            return (args[0], after_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": after_closure}


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(f.lower() for f in formats))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown report format(s) {unknown}; choose from {list(FORMATS)}")
    return chosen


def write_report(report: Any, output_dir: str | Path, formats: Sequence[str]) -> list[Path]:
    """Write ``gradscope-watch.<format>`` for each format into ``output_dir``."""
    from gradscope.render import write_html, write_json

    writers = {"html": write_html, "json": write_json}
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{STEM}.{fmt}"
        writers[fmt](report, path)
        paths.append(path)
    return paths


def check_watch_args(every: int, horizon: int) -> None:
    if every < 1 or horizon < 1:
        raise ValueError("every and horizon must be at least 1")
