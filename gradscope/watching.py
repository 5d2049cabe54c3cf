"""``gradscope.watch``: the diagnosis on the first steps of the user's own training run.

Some failures cannot be seen at initialisation: an identity-initialised ReLU RNN that
diverges under SGD after a few steps, units that die once the first updates push their
biases down, a run whose loss never moves. The watch records the first ``horizon``
optimizer steps of the real run (the user's data, loss and optimizer) and the rules over
steps (GS105, GS106, GS203, GS403, GS503, GS603-GS606) judge them::

    with gradscope.watch(model, optimizer) as watch:
        for x, y in loader:
            loss = criterion(model(x), y)
            watch.loss(loss)                 # optional: the loss rules need it
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()                 # the watch counts steps by the optimizer
    watch.report().write_html("watch.html")  # or write_json / write_sarif

How it stays cheap (issue 18 asks <= 1.2x the plain loop when recording every 10th step):

- the step boundary is the optimizer's own ``step`` (pre- and post-hooks), so the user's
  loop needs no call; every step costs one fused norm over the gradients
  (``torch._foreach_norm``), kept on the device and read back in bulk;
- module hooks are registered only for the forward and backward of a recorded step and
  removed at its optimizer step, so the other steps run the model untouched;
- the weights are copied only at recorded steps, to measure the update the optimizer
  really applied.

The model and the optimizer are left as found: every hook is removed when the watch ends
(``close``, the end of the ``with`` block, or the horizon), whatever happened.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradscope.distributed import is_shard, local_tensor, process_group
from gradscope.errors import OutputError
from gradscope.lr_range import output_picker
from gradscope.probe import DEAD_KEYS, SATURATION_KEYS, forward_checks, sq_sum
from gradscope.steps import LayerStep, StepRecord, TrainingRecord
from gradscope.tracing.graph import op_naming

#: Called with each recorded step as soon as its optimizer step is done (sinks).
StepSink = Callable[[TrainingRecord, StepRecord], None]


def _output_of(value: Any) -> torch.Tensor | None:
    """The floating tensor of a module's or the model's output that the probe would
    differentiate (``lr_range.output_picker``: a ``ModelOutput``'s logits, not its loss;
    a tuple's first), or None."""
    try:
        return _PICK(value)  # type: ignore[no-any-return]
    except OutputError:
        return None


_PICK = output_picker(None)

#: A recorded step's sums (``Watch._local_sums``): for the model output, and for each
#: module, counts of the processes (or elements) that saw a figure and sums over elements,
#: so that summing them over processes gives the whole batch's and whole weights' figures.
_OUTPUT = ("seen", "grad_sq", "numel")
_MODULE = ("grad_seen", "grad_sq", "numel", "forward_seen", "nonfinite", "dead_seen", "dead",
           "saturated_numel", "saturated", "weights_seen", "weight_sq", "weight_grad_sq",
           "update_sq", "units", "units_sq")
Sums = dict[str, float]


def check_cadence(every: int, horizon: int) -> None:
    """``every`` and ``horizon`` of a watch: both at least 1."""
    if every < 1 or horizon < 1:
        raise ValueError("every and horizon must be at least 1")


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    return type(optimizer).__name__.lower()


class _Pending:
    """The recorded step under way: device tensors, read back once at its optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.grad_sq: dict[str, list[torch.Tensor]] = {}
        self.numel: dict[str, int] = {}
        self.dead: dict[str, torch.Tensor] = {}
        self.saturated: dict[str, torch.Tensor] = {}
        self.saturated_numel: dict[str, int] = {}
        #: Across processes only: each ReLU-like module's units active on some sample of
        #: this process's batch (a unit is dead where it is inactive on every process).
        self.active: dict[str, torch.Tensor] = {}
        self.bad_forward: dict[str, bool | torch.Tensor] = {}
        self.output: torch.Tensor | None = None
        self.output_sq: list[torch.Tensor] = []
        #: The last leaf module whose output needed a gradient: the output's stand-in when
        #: the model's own forward never ran (a Lightning module calling ``self.net(x)``).
        self.last: str | None = None
        #: Modules in the order their forward first ran (a dict as an ordered set).
        self.order: dict[str, None] = {}
        self.before: dict[str, list[torch.Tensor]] = {}


class Watch:
    """Records the first ``horizon`` steps of a training run; see the module docstring.

    ``every``: record per-module figures at steps 0, every, 2*every, ...; ``horizon``:
    stop recording after this many optimizer steps (the model and optimizer are then left
    as found, even if the ``with`` block goes on). ``sinks`` are called with each recorded
    step (``gradscope.sinks``: TensorBoard, Weights & Biases). ``name`` is the report's.
    ``across_processes``: under torch.distributed, sum the figures over the processes
    (every process must then watch, in step); False keeps this process's own figures, for a
    watch on one process only (``if rank == 0``), which would otherwise wait for the others.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 every: int = 10, horizon: int = 50, name: str | None = None,
                 sinks: Sequence[StepSink] = (),
                 replay: Callable[[nn.Module, int], torch.Tensor] | None = None,
                 across_processes: bool = True) -> None:
        check_cadence(every, horizon)
        group = process_group() if across_processes else None
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
            raise ValueError("FSDP1 (FullyShardedDataParallel) flattens the weights into "
                             "shards the watch cannot give back to their modules: shard with "
                             "FSDP2 (torch.distributed.fsdp.fully_shard), which it reads")
        if replay is not None and group is not None:
            raise ValueError("replay trains copies of the run in one process; it is not "
                             "available across processes (torch.distributed): watch without "
                             "replay, or replay in a single-process run")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.horizon = horizon
        self.name = name or type(model).__name__
        self.sinks = list(sinks)
        #: ``replay(model, step)``: step ``step``'s loss on a given model (the user's batch
        #: and loss); with it, the advice of the report is trained on copies before it is
        #: offered (``gradscope.replay``).
        self.replay = replay
        self._initial: nn.Module | None = None
        self._findings: list[Any] | None = None
        self._modules: dict[str, nn.Module] = {
            path: m for path, m in model.named_modules()
            if path and next(m.children(), None) is None}
        self._params: dict[str, list[nn.Parameter]] = {
            path: [p for p in m.parameters(recurse=False) if p.requires_grad]
            for path, m in self._modules.items()}
        self._all_params = [p for group in optimizer.param_groups for p in group["params"]
                            if p.requires_grad]
        owner: dict[int, str] = {}
        for path, params in self._params.items():
            for p in params:
                owner.setdefault(id(p), path)
        self._owner = [owner.get(id(p)) for p in self._all_params]
        # Across processes (torchrun): a figure summed over elements is summed over the
        # processes too, where each holds a part (FSDP2 shards, each process's batch). A
        # replicated parameter (DDP: the same all-reduced gradient everywhere) enters each
        # process's sum at 1/world of its weight, so that the sum over processes counts it
        # once. Without a shard, every process already has the whole norms: no collective.
        self._group = group
        world = group[1] if group is not None else 1
        self._world = world
        self._sharded = any(is_shard(p) for p in self._all_params)
        self._share = [self._part(p) for p in self._all_params]
        self._in_flight: list[Any] = []  # the per-step norms' all-reduces under way
        self._sums_device = (local_tensor(self._all_params[0]).device if self._all_params
                             else torch.device("cpu"))
        #: Closed by an error: no collective any more (another process may be gone); the
        #: record keeps this process's own figures from then on.
        self._abandoned = False
        keys = {path: op_naming("call_module", type(m).__name__, m)[1]
                for path, m in self._modules.items()}
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        self.record = TrainingRecord(
            every=every, horizon=horizon, optimizer=_optimizer_name(optimizer),
            lr=float(lr) if isinstance(lr, (int, float)) else None,
            modules={path: type(m).__name__ for path, m in self._modules.items()},
            trainable=tuple(p for p, ps in self._params.items() if ps),
            rectifiers=tuple(p for p, k in keys.items() if k in DEAD_KEYS),
            squashers=tuple(p for p, k in keys.items() if k in SATURATION_KEYS))
        self._keys = keys
        self._step = 0
        self._losses: list[torch.Tensor | None] = []
        self._norms: list[torch.Tensor] = []
        self._bad: list[torch.Tensor] = []
        self._pending: _Pending | None = None
        self._module_handles: list[Any] = []
        self._handles: list[Any] = []
        self._open = False
        self._closed = False
        self._recording = True

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(error=exc is not None)

    def start(self) -> Watch:
        """Install the optimizer hooks and arm the first recorded step."""
        if self._open or self._closed:
            return self
        self._open = True
        if self.replay is not None:  # the run as it starts, for the copies advice is tried on
            self._initial = copy.deepcopy(self.model)
        self._handles = [self.optimizer.register_step_pre_hook(self._pre_step),
                         self.optimizer.register_step_post_hook(self._post_step)]
        self._arm()
        return self

    def close(self, *, error: bool = False) -> TrainingRecord:
        """Remove every hook (the model and optimizer as found) and finish the record.

        ``error``: the run stopped on an exception; across processes, the losses are then
        this process's own (no collective: the other processes may be gone)."""
        if self._closed:
            return self.record
        if error and self._group is not None:
            self._abandoned = True
            self.record.notes.append("the run stopped on an error: the losses and non-finite "
                                     "flags are this process's own, not summed over the "
                                     f"{self._world} processes")
        self._stop_recording()
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._finish()  # after the last loss a callback may hand over past the horizon
        self._open = False
        return self.record

    def _stop_recording(self) -> None:
        """The horizon or the end: no more hooks on the model, the record finished.

        Called from inside the optimizer's post-hook at the horizon, where removing that
        hook would change the dict torch is iterating: it stays, a no-op, until ``close``.
        """
        if not self._recording:
            return
        self._recording = False
        self._disarm()
        if self._handles:
            self._handles[0].remove()  # the pre-hook: not being iterated here

    @property
    def active(self) -> bool:
        return self._open and self._recording

    # -- what the user hands over ------------------------------------------------------
    @property
    def step(self) -> int:
        """The optimizer step under way (0 before the first ``optimizer.step()``)."""
        return self._step

    def loss(self, value: torch.Tensor | float, step: int | None = None) -> None:
        """The loss of a step, kept on the device: by default the step under way (call it
        before ``optimizer.step()``); a callback that sees the loss after the step passes
        ``step=watch.step - 1``."""
        at = self._step if step is None else step
        if not self._open or at < 0 or at >= self.horizon:
            return
        if not self._recording and at >= len(self._norms):
            return
        if isinstance(value, torch.Tensor):
            kept: torch.Tensor | None = value.detach().reshape(-1)[:1].float().clone()
        else:
            kept = torch.tensor([float(value)])
        while len(self._losses) <= at:
            self._losses.append(None)
        self._losses[at] = kept

    # -- module hooks, armed for one recorded step --------------------------------------
    def _arm(self) -> None:
        if self._step % self.every != 0 or self._step >= self.horizon:
            return
        pending = self._pending = _Pending(self._step)
        handles = self._module_handles
        handles.append(self.model.register_forward_hook(self._model_hook(pending)))
        for path, module in self._modules.items():
            handles.append(module.register_forward_hook(self._module_hook(path, pending)))

    def _disarm(self) -> None:
        for handle in self._module_handles:
            handle.remove()
        self._module_handles = []

    def _model_hook(self, pending: _Pending) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            y = _output_of(out)
            if y is None or not y.requires_grad or pending.output is not None:
                return
            pending.output = y
            y.register_hook(lambda g: pending.output_sq.append(sq_sum(g.detach())))
        return hook

    def _module_hook(self, path: str, pending: _Pending) -> Callable[..., None]:
        key = self._keys[path]

        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if path not in pending.order:
                pending.order[path] = None
            y = _output_of(out)
            if y is None:
                return
            with torch.no_grad():
                bad, active, saturated = forward_checks(key, y.detach())
                pending.bad_forward[path] = bad
                if active is not None:
                    pending.dead[path] = active.float().mean()
                    if self._group is not None:
                        pending.active[path] = active
                if saturated is not None:
                    pending.saturated[path] = saturated
                    pending.saturated_numel[path] = y.numel()
            if y.requires_grad:
                pending.last = path
                pending.numel[path] = pending.numel.get(path, 0) + y.numel()
                y.register_hook(lambda g: pending.grad_sq.setdefault(path, []).append(
                    sq_sum(g.detach())))
        return hook

    # -- optimizer hooks: the step boundary --------------------------------------------
    def _pre_step(self, _optimizer: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """Before the optimizer step: the gradients are complete, the weights not yet changed.

        ``optimizer.step(closure)`` (Lightning's automatic optimization, LBFGS) computes the
        step's forward and backward inside the step, after this hook: the work then moves to
        the end of the closure's first call, through the closure handed back to torch (a
        step pre-hook may return new arguments), or it would read the previous step's
        gradients and disarm the module hooks before the step's own forward.
        """
        if not self.active:
            return None
        closure = kwargs.get("closure")
        positional = closure is None and len(args) > 1 and callable(args[1])
        if positional:
            closure = args[1]  # args[0] is the optimizer: torch hands the bound call's args
        if closure is None:
            self._before_update()
            return None
        done = False

        def after_closure() -> Any:
            nonlocal done
            result = closure()
            if not done:
                done = True
                self._before_update()
            return result

        if positional:
            return (args[0], after_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": after_closure}

    def _before_update(self) -> None:
        at = [i for i, p in enumerate(self._all_params) if p.grad is not None]
        if at:
            grads = [local_tensor(self._all_params[i].grad) for i in at]  # type: ignore[arg-type]
            norms: Sequence[torch.Tensor]
            try:
                norms = torch._foreach_norm(grads)
            except (RuntimeError, NotImplementedError):  # sparse gradients
                norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g)
                         for g in grads]
            stacked = torch.stack([n.float() for n in norms])
            squares = stacked.square()
            if self._sharded:
                squares = squares * torch.tensor([self._share[i] for i in at],
                                                 device=squares.device)
            total = squares.sum()
            # per parameter: which module's gradient went non-finite first
            bad = torch.zeros(len(self._all_params), dtype=torch.bool, device=stacked.device)
            bad[torch.tensor(at, device=stacked.device)] = ~torch.isfinite(stacked)
        else:
            total = torch.zeros((), device=self._sums_device)
            bad = torch.zeros(len(self._all_params), dtype=torch.bool)
        if self._sharded and self._group is not None:  # every process sums its shards' part
            import torch.distributed as dist

            self._in_flight.append(dist.all_reduce(total, group=self._group[0], async_op=True))
        self._norms.append(total)  # the squared norm, its root taken when read back
        self._bad.append(bad)
        pending = self._pending
        if pending is not None:
            self._disarm()
            for path, params in self._params.items():
                if params:
                    pending.before[path] = [local_tensor(p.detach()).clone() for p in params]

    def _post_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        if not self.active:
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            step = self._read(pending)
            self.record.recorded.append(step)
            if self.sinks:
                self._series_so_far()
                for sink in self.sinks:
                    sink(self.record, step)
        self._step += 1
        if self._step >= self.horizon:
            self._stop_recording()
            return
        self._arm()

    def _read(self, pending: _Pending) -> StepRecord:
        """The recorded step's figures, read back from the device once (and, across
        processes, summed over them in one collective)."""
        out, rows = self._local_sums(pending)
        dead: dict[str, float] = {}
        if self._group is not None and not self._abandoned:
            out, rows = self._over_processes(out, rows)
            dead = self._dead_over_processes(pending, rows)
            # Data parallelism trains on the mean of the processes' losses, so the whole
            # batch's dLoss/d(output) is each process's over the number of processes: the
            # summed squares of the output's and each module's are world^2 too large.
            scale = 1.0 / self._world ** 2
            out["grad_sq"] *= scale
            for row in rows.values():
                row["grad_sq"] *= scale
        out_rms = (math.sqrt(out["grad_sq"] / out["numel"]) if out["seen"] and out["numel"]
                   else None)
        last = pending.last
        if out_rms is None and last is not None:
            row = rows[last]
            if row["grad_seen"] and row["numel"] and row["grad_sq"] > 0:
                out_rms = math.sqrt(row["grad_sq"] / row["numel"])
        rec = StepRecord(step=pending.step, output_grad_rms=out_rms)
        if not self.record.order:
            self.record.order = tuple(pending.order)
        for path, row in rows.items():
            layer = LayerStep()
            seen = False
            if row["forward_seen"]:
                layer.nonfinite_forward = row["nonfinite"] > 0
                seen = True
            if row["grad_seen"] and row["numel"]:
                g_sq = row["grad_sq"]
                layer.nonfinite_grad = not math.isfinite(g_sq)
                rms = math.sqrt(g_sq / row["numel"]) if math.isfinite(g_sq) else math.inf
                layer.grad_rms = rms / out_rms if out_rms else None
                seen = True
            if path in dead:
                layer.dead_fraction = dead[path]
            elif row["dead_seen"]:  # a mean over processes where their unit counts differ
                layer.dead_fraction = row["dead"] / row["dead_seen"]
            if row["saturated_numel"]:
                layer.saturated_fraction = row["saturated"] / row["saturated_numel"]
            if row["weights_seen"]:
                w_sq, gw_sq = row["weight_sq"], row["weight_grad_sq"]
                layer.weight_norm = math.sqrt(w_sq)
                layer.weight_grad_norm = math.sqrt(gw_sq) if math.isfinite(gw_sq) else math.inf
                layer.update_ratio = (math.sqrt(row["update_sq"]) / math.sqrt(w_sq)
                                      if w_sq > 0 else None)
                seen = True
            if seen:
                rec.layers[path] = layer
        return rec

    def _local_sums(self, pending: _Pending) -> tuple[Sums, dict[str, Sums]]:
        """This process's sums of a recorded step (``_OUTPUT``, and ``_MODULE`` for each
        module in ``self._modules`` order)."""
        out = dict.fromkeys(_OUTPUT, 0.0)
        if pending.output_sq and pending.output is not None:
            out.update(seen=1.0, grad_sq=sum(float(t) for t in pending.output_sq),
                       numel=float(pending.output.numel()))
        rows: dict[str, Sums] = {}
        for path in self._modules:
            row = rows[path] = dict.fromkeys(_MODULE, 0.0)
            if path in pending.grad_sq and pending.numel.get(path):
                row.update(grad_seen=1.0, grad_sq=sum(float(t) for t in pending.grad_sq[path]),
                           numel=float(pending.numel[path]))
            if path in pending.bad_forward:
                row.update(forward_seen=1.0, nonfinite=float(bool(pending.bad_forward[path])))
            if path in pending.dead:
                row.update(dead_seen=1.0, dead=1.0 - float(pending.dead[path]))
            if path in pending.saturated:
                size = float(pending.saturated_numel[path])
                row.update(saturated_numel=size, saturated=float(pending.saturated[path]) * size)
            before = pending.before.get(path)
            if before:
                params = self._params[path]
                parts = [self._part(p) for p in params]
                row["weights_seen"] = 1.0
                row["weight_sq"] = sum(w * float(sq_sum(b))
                                       for w, b in zip(parts, before, strict=True))
                row["weight_grad_sq"] = sum(w * float(sq_sum(local_tensor(p.grad)))
                                            for w, p in zip(parts, params, strict=True)
                                            if p.grad is not None)
                row["update_sq"] = sum(w * float(sq_sum(local_tensor(p.detach()) - b))
                                       for w, p, b in zip(parts, params, before, strict=True))
            mask = pending.active.get(path)
            if mask is not None:  # its size and squared size: equal on every process?
                row.update(units=float(mask.numel()), units_sq=float(mask.numel()) ** 2)
        return out, rows

    def _over_processes(self, out: Sums, rows: dict[str, Sums]
                        ) -> tuple[Sums, dict[str, Sums]]:
        """The sums added over the processes: one all-reduce of them all, in float64."""
        flat = [out[k] for k in _OUTPUT] + [row[k] for row in rows.values() for k in _MODULE]
        summed = iter(self._sum_over_processes(flat))
        return ({k: next(summed) for k in _OUTPUT},
                {path: {k: next(summed) for k in _MODULE} for path in rows})

    def _dead_over_processes(self, pending: _Pending, rows: dict[str, Sums]
                             ) -> dict[str, float]:
        """Per ReLU-like module, the share of units inactive on every sample of every
        process's batch: the processes' activity masks combined in one collective (MAX),
        for the modules every process saw with the same number of units (which ``rows``,
        already summed over processes, tells alike on every process)."""
        import torch.distributed as dist

        assert self._group is not None
        world = self._world
        chosen = [(path, int(row["units"] / world)) for path, row in rows.items()
                  if row["dead_seen"] == world and row["units"] > 0
                  and row["units_sq"] * world == row["units"] ** 2]
        if not chosen:
            return {}
        masks = [pending.active[path].reshape(-1).to(torch.float32) for path, _ in chosen]
        flat = torch.cat(masks).to(self._sums_device)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self._group[0])
        out, at = {}, 0
        for path, size in chosen:
            out[path] = 1.0 - float(flat[at:at + size].mean())
            at += size
        return out

    def _part(self, p: torch.Tensor) -> float:
        """The share of ``p``'s sums over elements this process adds to the sum over
        processes: all of its shard's, 1/world of a parameter every process holds whole."""
        return 1.0 if self._group is None or is_shard(p) else 1.0 / self._world

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (one all-reduce, float64)."""
        import torch.distributed as dist

        assert self._group is not None
        t = torch.tensor(values, dtype=torch.float64, device=self._sums_device)
        dist.all_reduce(t, group=self._group[0])
        return [float(v) for v in t.cpu().tolist()]

    def _series_so_far(self, losses_past_steps: bool = False) -> None:
        """The per-step gradient norms and losses read back from the device in bulk.

        During the run (for the sinks; a recorded step has synchronised already) the losses
        of the steps taken; at the end (``losses_past_steps``) also a loss handed over
        without an optimizer step: a loop that stops at a non-finite loss does that.
        """
        record = self.record
        steps = len(self._norms)
        for work in self._in_flight:
            work.wait()
        self._in_flight = []
        record.grad_norms = torch.stack([n.detach().float().cpu() for n in self._norms]
                                        ).sqrt().tolist() if self._norms else []
        count = min(max(steps, len(self._losses)), self.horizon) if losses_past_steps \
            else steps
        kept = [self._losses[i] if i < len(self._losses) else None for i in range(count)]
        record.losses = [None if t is None else float(t.cpu()[0]) for t in kept]
        if losses_past_steps and self._group is not None and not self._abandoned:
            self._losses_over_processes()

    def _losses_over_processes(self) -> None:
        """At the end, across processes: each step's loss is the mean of the processes'
        (each hands over its own batch's loss), and a parameter's gradient is non-finite
        where it is on some process. One collective over ``horizon``-long lists, the same
        length on every process."""
        record, size = self.record, self.horizon
        flat = [0.0] * (2 * size)
        for i, v in enumerate(record.losses[:size]):
            if v is not None:
                flat[i], flat[size + i] = v, 1.0
        flags = [0.0] * (size * len(self._all_params))
        for i, bad in enumerate(self._bad[:size]):
            for j, b in enumerate(bad.cpu().tolist()):
                flags[i * len(self._all_params) + j] = float(b)
        summed = self._sum_over_processes(flat + flags)
        count = max(len(record.losses), max((i + 1 for i in range(size)
                                             if summed[size + i] > 0), default=0))
        record.losses = [summed[i] / summed[size + i] if summed[size + i] else None
                         for i in range(count)]
        n = len(self._all_params)
        self._bad = [torch.tensor([summed[2 * size + i * n + j] > 0 for j in range(n)])
                     for i in range(len(self._bad))]

    def _finish(self) -> None:
        """The final per-step series; the first non-finite step and its modules."""
        record = self.record
        self._series_so_far(losses_past_steps=True)
        steps, losses = len(record.grad_norms), record.losses
        for i in range(len(losses)):
            loss = losses[i]
            norm = record.grad_norms[i] if i < steps else 0.0
            bad_loss = loss is not None and not math.isfinite(loss)
            if norm is None or not math.isfinite(norm) or bad_loss:
                record.first_nonfinite_step = i
                bad = self._bad[i].cpu().tolist() if i < len(self._bad) else []
                names = [self._owner[j] for j, b in enumerate(bad) if b]
                record.first_nonfinite_modules = tuple(dict.fromkeys(
                    n for n in names if n is not None))
                break
        if steps < self.horizon:
            record.notes.append(f"the run ended after {steps} optimizer step(s), before the "
                                f"watch's horizon of {self.horizon}")
        if not any(v is not None for v in losses):
            record.notes.append("no loss was handed to the watch (watch.loss(loss)): the "
                                "loss rules (GS604-GS606) did not run")
        self._norms, self._bad, self._losses = [], [], []

    # -- the verdict ---------------------------------------------------------------------
    def findings(self) -> list[Any]:
        """The rules over steps on what was recorded (closing the watch first); with
        ``replay``, the loop changes that trained copies better attached to them."""
        if self._findings is None:
            from gradscope.rules.steps import run_step_rules

            found = run_step_rules(self.close())
            if self.replay is not None and self._initial is not None:
                from gradscope.replay import verified_findings

                found = verified_findings(found, self.record, self.model, self._initial,
                                          self.optimizer, self.replay, Watch)
                self._initial = None
            self._findings = found
        return self._findings

    def report(self) -> Any:
        """The report of the watched steps: a ``gradscope.report.Report`` with its writers
        (``report.write_html(path)``, ``write_json``, ``write_sarif``)."""
        from gradscope.render.notebook import NotebookReport
        from gradscope.report import watch_report

        record = self.close()
        params = list(dict.fromkeys(self.model.parameters()))
        return watch_report(self.name, record, self.findings(),
                            num_parameters=sum(p.numel() for p in params),
                            num_trainable=sum(p.numel() for p in params if p.requires_grad),
                            device=str(params[0].device) if params else "cpu",
                            cls=NotebookReport)


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, *, every: int = 10,
          horizon: int = 50, name: str | None = None, sinks: Iterable[StepSink] = (),
          replay: Callable[[nn.Module, int], torch.Tensor] | None = None,
          across_processes: bool = True) -> Watch:
    """Watch the first ``horizon`` optimizer steps of a training run (a context manager).

    ``replay(model, step)``, when given, computes watched step ``step``'s loss on another
    model (your batch ``step`` and your loss): the report's loop advice (a lower learning
    rate, clipping, a warmup) is then trained on copies of the run and offered only where it
    ended the watched steps lower (``gradscope.replay``). It costs one copy of the model at
    the start and, for a run with findings, three more short runs of the watched steps.

    Under torch.distributed (DDP, FSDP2) every process watches and the figures are the
    whole run's, summed over the processes in collectives; a watch on one process only
    passes ``across_processes=False`` (this process's figures) or it waits for the others.
    """
    return Watch(model, optimizer, every=every, horizon=horizon, name=name,
                 sinks=tuple(sinks), replay=replay, across_processes=across_processes)
