"""What the framework callbacks share: the real torch optimizer and the report files.

(Steps whose gradients a closure computes, as Lightning's, are the watch's own concern:
``gradscope.watching.Watch`` moves its pre-step work after the closure.)"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradscope.watching import Watch, check_cadence

if TYPE_CHECKING:
    from gradscope.watching import StepSink

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


class WatchSettings:
    """What both callbacks are given and hand back: the watch's ``every`` and ``horizon``,
    where and in which formats the report is written, the report's ``name``, the ``sinks``;
    after training, ``report`` and the ``paths`` written."""

    def __init__(self, every: int, horizon: int, output_dir: str | Path | None,
                 formats: Iterable[str], name: str | None, sinks: Sequence[StepSink]) -> None:
        check_cadence(every, horizon)  # at construction, before any training starts
        self.every = every
        self.horizon = horizon
        self.output_dir = output_dir
        self.formats = check_formats(formats)
        self.name = name
        self.sinks = tuple(sinks)
        self.watch: Watch | None = None
        self.report: Any = None
        self.paths: list[Path] = []
        self._folder: Path | None = None
        self._writer = True

    def _begin(self, default_dir: str | Path, writer: bool) -> None:
        """A training run starts: where its report goes, and whether this process writes
        it (every process watches, since across processes the figures are summed in
        collectives all of them join; one writes)."""
        self._folder = Path(self.output_dir if self.output_dir is not None else default_dir)
        self._writer = writer
        self.report, self.paths = None, []

    def _open(self, model: Any, optimizer: Any) -> Watch | None:
        """The watch on ``model`` and the torch optimizer under ``optimizer``, started; None
        (with a warning) for a set-up the watch cannot read: the run trains on, unwatched."""
        try:
            watch = Watch(model, torch_optimizer(optimizer), every=self.every,
                          horizon=self.horizon, name=self.name, sinks=self.sinks)
        except ValueError as exc:
            warnings.warn(f"gradscope: not watching this run: {exc}", stacklevel=3)
            return None
        return watch.start()

    def _end(self, error: bool = False) -> None:
        """Close the watch (every hook removed), keep its report, and write it where this
        process is the writer. ``error``: training failed (no collective then)."""
        watch, self.watch = self.watch, None
        if watch is None:
            return
        watch.close(error=error)
        self.report = watch.report()
        if self._writer and self._folder is not None and self.formats:
            self.paths = write_report(self.report, self._folder, self.formats)
