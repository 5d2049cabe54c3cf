"""``gradscope.watch`` in the Hugging Face ``Trainer``, as a callback::

    from gradscope.integrations.huggingface import GradscopeCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GradscopeCallback(every=10, horizon=50)])
    trainer.train()   # writes gradscope-watch.html and .json into args.output_dir

How it meets the ``Trainer`` (transformers 5, read from its ``_inner_training_loop``):

- ``on_train_begin`` runs after the optimizer is made and prepared by accelerate, and
  receives it as ``optimizer``: an ``AcceleratedOptimizer`` whose ``step`` calls the torch
  optimizer's, so the watch goes on the torch optimizer under it (``.optimizer``). Where a
  trainer makes its optimizer later, the first ``on_step_begin`` that has one starts it.
- The loss: callbacks are not handed the per-step loss, so a forward hook on the model
  reads ``output.loss`` (what a Hugging Face model returns when the batch has labels) on
  training forwards only. Over gradient accumulation, a step's loss is the mean of its
  micro-batches' (their sum where the ``Trainer`` passes ``num_items_in_batch``: each
  micro-batch's loss is then already divided by the whole step's token count; across
  processes that count is all processes' and the Trainer multiplies the loss by their
  number, as the watch does, which then averages over the processes).
- Across processes (DDP, FSDP2) every process watches, since the figures are summed over
  the processes in collectives every process takes part in; world process zero alone
  writes the report, when training ends or when the watch reaches its horizon
  (``on_step_end``), whichever comes first; every hook is removed then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gradscope.integrations._common import (
    WatchSettings,
)
from gradscope.watching import StepSink


class GradscopeCallback(WatchSettings, TrainerCallback):
    """Watch the first ``horizon`` optimizer steps of a ``Trainer`` run and write the report.

    ``every`` and ``horizon`` are the watch's; ``output_dir`` defaults to the Trainer's
    ``args.output_dir``; ``formats`` are written as ``gradscope-watch.<format>``; ``sinks``
    are handed to the watch (``gradscope.sinks``). After training, ``report`` is the
    ``gradscope.report.Report`` and ``paths`` the files written.
    """

    def __init__(self, every: int = 10, horizon: int = 50, output_dir: str | Path | None = None,
                 formats: Iterable[str] = ("html", "json"), *, name: str | None = None,
                 sinks: Sequence[StepSink] = ()) -> None:
        WatchSettings.__init__(self, every, horizon, output_dir, formats, name, sinks)
        self._armed = False
        self._model: torch.nn.Module | None = None
        self._hook: Any = None
        self._loss_step = -1
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._parts = 1

    # -- Trainer events ------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        self._finish()  # a callback reused by a second train() starts over
        self._armed = True
        self._begin(args.output_dir, bool(getattr(state, "is_world_process_zero", True)))
        # Averaging tokens across processes, the Trainer divides each process's loss by the
        # whole step's token count and multiplies it by the number of processes (DDP then
        # averages); the model's ``output.loss`` comes before that product.
        world = int(getattr(args, "world_size", 1) or 1)
        self._parts = world if getattr(args, "average_tokens_across_devices", False) else 1
        self._model = model
        if model is not None and optimizer is not None:
            self._start(model, optimizer)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                      optimizer: Any = None, **kwargs: Any) -> None:
        if self._armed and self.watch is None and optimizer is not None:
            self._start(model if model is not None else self._model, optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None and self.watch.step >= self.horizon:
            self._finish()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish()

    # -- the watch -----------------------------------------------------------------------
    def _start(self, model: Any, optimizer: Any) -> None:
        if model is None:
            return
        self.watch = self._open(model, optimizer)
        if self.watch is None:
            self._armed = False
            return
        self._loss_step, self._loss_sum, self._loss_count = -1, None, 0
        self._hook = model.register_forward_hook(self._read_loss, with_kwargs=True)

    def _read_loss(self, module: torch.nn.Module, args: Any, kwargs: Mapping[str, Any],
                   output: Any) -> None:
        watch = self.watch
        if watch is None or not module.training or not torch.is_grad_enabled():
            return
        loss = _loss_of(output, kwargs)
        if loss is None:
            return
        if watch.step != self._loss_step:
            self._loss_step, self._loss_sum, self._loss_count = watch.step, None, 0
        value = loss.detach().float().reshape(-1)[:1]
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1
        summed = kwargs.get("num_items_in_batch") is not None
        watch.loss(self._loss_sum * self._parts if summed
                   else self._loss_sum / self._loss_count)

    def _finish(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.watch is not None:
            self._end()
            self._armed = False


def _loss_of(output: Any, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The loss a Hugging Face model returned: ``output.loss``, or the first element of a
    tuple output (``return_dict=False``) when the call had labels."""
    loss: Any = None
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, tuple) and output and kwargs.get("labels") is not None:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() >= 1 and loss.is_floating_point():
        return loss
    return None


__all__ = ["GradscopeCallback"]
