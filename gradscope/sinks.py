"""Sinks for ``gradscope.watch``: each recorded step's figures, logged live.

A sink is any callable ``sink(record, step)`` (:data:`gradscope.watching.StepSink`); the
watch calls it right after the optimizer step of every recorded step (every ``every``-th
step, up to the horizon)::

    from gradscope.sinks import TensorBoardSink

    with gradscope.watch(model, optimizer, sinks=[TensorBoardSink("runs/exp1")]):
        ...

Both sinks log the same scalars (:func:`step_scalars`), at the watch's step:

- ``gradscope/<module>/grad_rms``, ``update_ratio``, ``dead_fraction``,
  ``saturated_fraction``: the module's figures at that step (those it has);
- ``gradscope/weight_grad_norm``: the gradient norm over the watched modules' own
  parameters at that step, from the per-module figures;
- ``gradscope/output_grad_rms``: the gradient reaching the model's output;
- ``gradscope/grad_norm`` and ``gradscope/loss``: the total gradient norm and the loss of
  that step (the watch reads its per-step series back up to each recorded step before it
  calls the sinks; a loss handed over only after the step, as the Lightning callback does,
  is not there yet).

Neither library is imported until a sink is made: ``import gradscope.sinks`` needs neither.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradscope.steps import StepRecord, TrainingRecord

#: Tag prefix of every scalar the sinks log.
PREFIX = "gradscope"

#: The per-module figures the sinks log, in this order.
LAYER_FIGURES = ("grad_rms", "update_ratio", "dead_fraction", "saturated_fraction")


def step_scalars(record: TrainingRecord, step: StepRecord) -> dict[str, float]:
    """The scalars of one recorded step, tag -> value (figures that are None are left out;
    non-finite ones are kept, as they are what a diverging run shows)."""
    out: dict[str, float] = {}
    at = step.step
    norm = record.grad_norms[at] if at < len(record.grad_norms) else None
    if norm is not None:
        out[f"{PREFIX}/grad_norm"] = float(norm)
    loss = record.losses[at] if at < len(record.losses) else None
    if loss is not None:
        out[f"{PREFIX}/loss"] = float(loss)
    if step.output_grad_rms is not None:
        out[f"{PREFIX}/output_grad_rms"] = float(step.output_grad_rms)
    norms = [layer.weight_grad_norm for layer in step.layers.values()
             if layer.weight_grad_norm is not None]
    if norms:
        out[f"{PREFIX}/weight_grad_norm"] = math.sqrt(sum(n * n for n in norms))
    for name, layer in step.layers.items():
        for figure in LAYER_FIGURES:
            value = getattr(layer, figure)
            if value is not None:
                out[f"{PREFIX}/{name}/{figure}"] = float(value)
    return out


class TensorBoardSink:
    """Writes each recorded step's scalars (:func:`step_scalars`) to TensorBoard.

    ``writer_or_logdir``: a ``torch.utils.tensorboard.SummaryWriter`` (left open: its owner
    closes it), or a directory for a writer of the sink's own (closed by :meth:`close`).
    Each recorded step is flushed at once, so TensorBoard shows it during the run.
    """

    def __init__(self, writer_or_logdir: Any) -> None:
        if isinstance(writer_or_logdir, (str, Path)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch raises it when tensorboard is missing
                raise ImportError(
                    "TensorBoardSink needs the tensorboard package: "
                    "pip install 'gradscope[tensorboard]'") from exc
            self.writer = SummaryWriter(log_dir=str(writer_or_logdir))
            self._owned = True
        else:
            self.writer = writer_or_logdir
            self._owned = False

    def __call__(self, record: TrainingRecord, step: StepRecord) -> None:
        for tag, value in step_scalars(record, step).items():
            self.writer.add_scalar(tag, value, global_step=step.step)
        self.writer.flush()

    def close(self) -> None:
        """Close the writer if the sink made it (a writer handed over stays open)."""
        if self._owned:
            self.writer.close()


class WandbSink:
    """Logs each recorded step's scalars (:func:`step_scalars`) to Weights & Biases.

    ``run``: the ``wandb`` run to log to; None logs to the active run (``wandb.log``).
    By default the scalars go on their own step axis, ``gradscope/step`` (the watch's
    optimizer step, declared with ``define_metric``), so they never clash with the steps
    a trainer logs on the same run; ``wandb_step=True`` passes the watch's step as W&B's
    own ``step=`` instead, for a run that logs nothing else.
    """

    def __init__(self, run: Any = None, *, wandb_step: bool = False) -> None:
        self.run = run
        self.wandb_step = wandb_step
        self._declared: set[int] = set()
        if run is None:
            self._wandb = _import_wandb()

    def _target(self) -> Any:
        if self.run is not None:
            return self.run
        if self._wandb.run is None:
            raise RuntimeError("WandbSink without a run logs to the active one: call "
                               "wandb.init() before the watch's first recorded step")
        return self._wandb.run

    def __call__(self, record: TrainingRecord, step: StepRecord) -> None:
        run = self._target()
        data: dict[str, float] = dict(step_scalars(record, step))
        if self.wandb_step:
            run.log(data, step=step.step)
            return
        if id(run) not in self._declared:
            run.define_metric(f"{PREFIX}/step")
            run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/step")
            self._declared.add(id(run))
        data[f"{PREFIX}/step"] = step.step
        run.log(data)


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("WandbSink needs the wandb package: pip install 'gradscope[wandb]'") \
            from exc
    return wandb


__all__ = ["LAYER_FIGURES", "PREFIX", "TensorBoardSink", "WandbSink", "step_scalars"]
