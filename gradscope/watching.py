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
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 every: int = 10, horizon: int = 50, name: str | None = None,
                 sinks: Sequence[StepSink] = (),
                 replay: Callable[[nn.Module, int], torch.Tensor] | None = None) -> None:
        check_cadence(every, horizon)
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
        self.close()

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

    def close(self) -> TrainingRecord:
        """Remove every hook (the model and optimizer as found) and finish the record."""
        if self._closed:
            return self.record
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
                if saturated is not None:
                    pending.saturated[path] = saturated
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
        grads = [p.grad for p in self._all_params if p.grad is not None]
        if grads:
            norms: Sequence[torch.Tensor]
            try:
                norms = torch._foreach_norm(grads)
            except (RuntimeError, NotImplementedError):  # sparse gradients
                norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g)
                         for g in grads]
            stacked = torch.stack([n.float() for n in norms])
            self._norms.append(stacked.square().sum().sqrt())
            # per parameter: which module's gradient went non-finite first
            index = [i for i, p in enumerate(self._all_params) if p.grad is not None]
            bad = torch.zeros(len(self._all_params), dtype=torch.bool, device=stacked.device)
            bad[torch.tensor(index, device=stacked.device)] = ~torch.isfinite(stacked)
            self._bad.append(bad)
        else:
            self._norms.append(torch.tensor(0.0))
            self._bad.append(torch.zeros(len(self._all_params), dtype=torch.bool))
        pending = self._pending
        if pending is not None:
            self._disarm()
            for path, params in self._params.items():
                if params:
                    pending.before[path] = [p.detach().clone() for p in params]

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
        """The recorded step's figures, read back from the device once."""
        out_sq = sum(float(t) for t in pending.output_sq) if pending.output_sq else None
        out_rms = (math.sqrt(out_sq / pending.output.numel())
                   if out_sq is not None and pending.output is not None
                   and pending.output.numel() else None)
        last = pending.last
        if out_rms is None and last is not None and pending.numel.get(last):
            last_sq = sum(float(t) for t in pending.grad_sq.get(last, []))
            out_rms = math.sqrt(last_sq / pending.numel[last]) if last_sq > 0 else None
        rec = StepRecord(step=pending.step, output_grad_rms=out_rms)
        if not self.record.order:
            self.record.order = tuple(pending.order)
        for path in self._modules:
            layer = LayerStep()
            seen = False
            if path in pending.bad_forward:
                layer.nonfinite_forward = bool(pending.bad_forward[path])
                seen = True
            if path in pending.grad_sq and pending.numel.get(path):
                sq = sum(float(t) for t in pending.grad_sq[path])
                layer.nonfinite_grad = not math.isfinite(sq)
                rms = math.sqrt(sq / pending.numel[path]) if math.isfinite(sq) else math.inf
                layer.grad_rms = rms / out_rms if out_rms else None
                seen = True
            if path in pending.dead:
                layer.dead_fraction = 1.0 - float(pending.dead[path])
            if path in pending.saturated:
                layer.saturated_fraction = float(pending.saturated[path])
            before = pending.before.get(path)
            if before:
                params = self._params[path]
                w_sq = sum(float(sq_sum(b)) for b in before)
                g_sq = sum(float(sq_sum(p.grad)) for p in params if p.grad is not None)
                u_sq = sum(float(sq_sum(p.detach() - b)) for p, b in zip(params, before,
                                                                         strict=True))
                layer.weight_norm = math.sqrt(w_sq)
                layer.weight_grad_norm = math.sqrt(g_sq) if math.isfinite(g_sq) else math.inf
                layer.update_ratio = (math.sqrt(u_sq) / math.sqrt(w_sq)) if w_sq > 0 else None
                seen = True
            if seen:
                rec.layers[path] = layer
        return rec

    def _series_so_far(self, losses_past_steps: bool = False) -> None:
        """The per-step gradient norms and losses read back from the device in bulk.

        During the run (for the sinks; a recorded step has synchronised already) the losses
        of the steps taken; at the end (``losses_past_steps``) also a loss handed over
        without an optimizer step: a loop that stops at a non-finite loss does that.
        """
        record = self.record
        steps = len(self._norms)
        record.grad_norms = torch.stack([n.detach().float().cpu() for n in self._norms]
                                        ).tolist() if self._norms else []
        count = min(max(steps, len(self._losses)), self.horizon) if losses_past_steps \
            else steps
        kept = [self._losses[i] if i < len(self._losses) else None for i in range(count)]
        record.losses = [None if t is None else float(t.cpu()[0]) for t in kept]

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
          replay: Callable[[nn.Module, int], torch.Tensor] | None = None) -> Watch:
    """Watch the first ``horizon`` optimizer steps of a training run (a context manager).

    ``replay(model, step)``, when given, computes watched step ``step``'s loss on another
    model (your batch ``step`` and your loss): the report's loop advice (a lower learning
    rate, clipping, a warmup) is then trained on copies of the run and offered only where it
    ended the watched steps lower (``gradscope.replay``). It costs one copy of the model at
    the start and, for a run with findings, three more short runs of the watched steps.
    """
    return Watch(model, optimizer, every=every, horizon=horizon, name=name,
                 sinks=tuple(sinks), replay=replay)
