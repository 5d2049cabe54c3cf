"""``gradscope.watch`` in Lightning, as a callback::

    from gradscope.integrations.lightning import GradscopeLightningCallback

    trainer = lightning.pytorch.Trainer(max_steps=1000,
                                        callbacks=[GradscopeLightningCallback(horizon=50)])
    trainer.fit(module, loader)   # writes gradscope-watch.html and .json into default_root_dir

Built on ``lightning.pytorch`` where it is installed, else on ``pytorch_lightning``.

How it meets Lightning (2.x, read from its fit loop and automatic optimization):

- ``on_train_start``: the watch goes on the torch optimizer of ``trainer.optimizers[0]``
  and on the ``LightningModule`` (its per-module figures are relative to the gradient at
  the module's own output; where ``training_step`` calls a submodule, ``self.net(x)``,
  instead of ``self(x)``, the last module that ran stands for the output).
- Automatic optimization calls ``optimizer.step(closure)``, and the closure runs the
  step's forward and backward *inside* the step, after torch's step pre-hooks: the watch
  moves its pre-step work (gradient norm, weights copied) to the end of the closure.
- ``on_train_batch_end`` comes after the optimizer step: the batch's loss
  (``outputs["loss"]``) goes to ``watch.step - 1``. Over gradient accumulation a step's
  loss is the sum of its batches' (Lightning has divided each by the accumulation count).
- Across processes (DDP, FSDP2) every process watches, since the figures are summed over
  the processes in collectives every process takes part in; global rank zero alone writes
  the report, when training ends, when the watch reaches its horizon, or when training
  fails (``on_exception``: then without a collective, this process's own losses); every
  hook is removed then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package, where lightning is absent
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ImportError as exc:
        raise ImportError("gradscope.integrations.lightning needs Lightning: "
                          "pip install 'gradscope[lightning]'") from exc

from gradscope.integrations._common import (
    WatchSettings,
)
from gradscope.watching import StepSink


class GradscopeLightningCallback(WatchSettings, Callback):
    """Watch the first ``horizon`` optimizer steps of a Lightning run and write the report.

    ``every`` and ``horizon`` are the watch's; ``output_dir`` defaults to the Trainer's
    ``default_root_dir``; ``formats`` are written as ``gradscope-watch.<format>``; ``sinks``
    are handed to the watch (``gradscope.sinks``). After training, ``report`` is the
    ``gradscope.report.Report`` and ``paths`` the files written.
    """

    def __init__(self, every: int = 10, horizon: int = 50, output_dir: str | Path | None = None,
                 formats: Iterable[str] = ("html", "json"), *, name: str | None = None,
                 sinks: Sequence[StepSink] = ()) -> None:
        WatchSettings.__init__(self, every, horizon, output_dir, formats, name, sinks)
        self._summed = True
        self._step_before = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    # -- Lightning hooks -----------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._end()  # a callback reused by a second fit() starts over
        if not trainer.optimizers:
            return
        self._begin(trainer.default_root_dir, bool(getattr(trainer, "is_global_zero", True)))
        self._summed = bool(getattr(pl_module, "automatic_optimization", True))
        self._loss_sum, self._loss_count = None, 0
        self.watch = self._open(pl_module, trainer.optimizers[0])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if self.watch is not None:
            self._step_before = self.watch.step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        watch = self.watch
        if watch is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            value = loss.detach().float().reshape(-1)[:1]
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        if watch.step > self._step_before:  # the optimizer stepped in this batch
            if self._loss_sum is not None:
                watch.loss(self._loss_sum if self._summed else self._loss_sum / self._loss_count,
                           step=watch.step - 1)
            self._loss_sum, self._loss_count = None, 0
        if watch.step >= self.horizon:
            self._end()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end(error=True)


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() >= 1 and loss.is_floating_point():
        return loss
    return None


__all__ = ["GradscopeLightningCallback"]
