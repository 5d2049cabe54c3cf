"""Probe: one real forward and backward on the target device, measured at every node.

The loss is ``<output, r>`` with ``r`` a fixed seeded Gaussian direction, so
dLoss/d(output) = r has RMS ~1 and every node's gradient is measured relative
to it. Gradients are collected with ``torch.autograd.grad`` and tensor hooks:
no ``.grad`` field of the user's model is written. Per-node sums of squares
are accumulated as tensors and read once at the end (no device sync per node).
The caller wraps this in :func:`gradscope.state.preserved`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from gradscope.errors import ModelRunError, model_error_hint
from gradscope.resources import Deadline
from gradscope.tracing.fx_tracers import NodeExecutionError
from gradscope.tracing.graph import TracedModel, node_record, tensor_leaves, to_device
from gradscope.tracing.ops import RELU_LIKE, SATURATION_EDGE


class StreamHooks(Protocol):
    """What the probe needs of ``--stream``'s :class:`gradscope.streaming.Streamer`."""

    #: ||W||^2 by id(parameter), measured while each weight was materialised.
    weight_sq: dict[int, float]

    def running(self) -> AbstractContextManager[None]:
        """Blocks checkpointed and materialised on demand while forward and backward run."""
        ...


class ShardHooks(Protocol):
    """What the probe needs of ``--distributed``'s :class:`gradscope.distributed.Sharded`."""

    weight_sq: dict[int, float]

    def linking(self, acc: Any) -> AbstractContextManager[None]:
        """FSDP's new input tensors counted as the ones they stand for, during a forward."""
        ...

    def param_stats(self, wanted: list[nn.Parameter], measured: set[int],
                    update: tuple[float | None, str, float],
                    ) -> dict[int, tuple[float, float] | None]:
        """(||grad W||^2, ||first update||^2) per measured parameter, over all shards."""
        ...

    def reduce_nodes(self, sq: dict[str, list[Any]], order: list[str]) -> None:
        """Each node's squared norms reduced over the process group, in place."""
        ...

#: Activations whose units can die: the ReLU-like family of the op table.
DEAD_KEYS = frozenset(f"activation:{name}" for name in RELU_LIKE)
#: Activations whose outputs are tested for "derivative below 1% of its maximum": those
#: the op table gives a saturation edge (GS301 predicts the same share from moments).
SATURATION_KEYS = frozenset(f"activation:{name}" for name in SATURATION_EDGE)


@dataclass
class ProbeResult:
    """What one forward/backward measured, per graph node."""

    device: str
    batch_size: int | None
    loss: str
    seed: int
    mode: str
    output_grad_rms: float | None = None
    #: Squared norm of dLoss/d(node output), relative to the model output's.
    sq_norm: dict[str, float] = field(default_factory=dict)
    grad_rms: dict[str, float | None] = field(default_factory=dict)
    param_grad_ratio: dict[str, float | None] = field(default_factory=dict)
    param_grad_norm: dict[str, float | None] = field(default_factory=dict)
    #: The global gradient norm over every trainable weight (each counted once), per
    #: probe batch: what ``clip_grad_norm_`` would see on each step.
    batch_grad_norms: list[float] = field(default_factory=list)
    #: RMS of the weight gradient's elements per node, on a mean-reduced loss: the
    #: user's loss as it is; a synthetic one ("dot", "sum") rescaled so that dLoss/d(output)
    #: has the RMS of a mean cross-entropy at chance, 1 / (rows x sqrt(classes)) for an
    #: output of ``rows`` rows of ``classes`` entries. Adam divides each element by
    #: sqrt(v) + eps: where this is below eps the step is not rescaled to the learning rate.
    param_grad_rms: dict[str, float | None] = field(default_factory=dict)
    #: How ``param_grad_rms`` was scaled (said in the findings that read it).
    grad_scale: str = ""
    #: ||first optimiser update|| / ||W|| per node, when a learning rate is given.
    update_ratio: dict[str, float | None] = field(default_factory=dict)
    lr: float | None = None
    optimizer: str | None = None
    dead_fraction: dict[str, float] = field(default_factory=dict)
    saturated_fraction: dict[str, float] = field(default_factory=dict)
    nonfinite_forward: list[str] = field(default_factory=list)
    nonfinite_backward: list[str] = field(default_factory=list)
    #: Nodes with non-finite forward values that reached neither the output nor any
    #: gradient (masked by ``torch.where`` and the like): harmless, noted, not judged.
    contained_nonfinite: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batches: int = 1
    #: (min, max) over batches of each node's gradient RMS ratio.
    grad_rms_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Per ReLU-like node: which units were active on any probe sample so far.
    active_units: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    saturated_counts: dict[str, int] = field(default_factory=dict, repr=False)


#: A per-node figure: a 0-dim device tensor (read once at the end, no sync per node),
#: or on the CPU, where reading costs nothing, a Python number. Thousands of 0-dim
#: tensors kept alive across a batch fragment the CPU heap between the large
#: activation buffers, and the next batch's peak grows with it.
Value = float | torch.Tensor
Flag = bool | torch.Tensor


class _Accumulator:
    """Tensor hooks and forward checks, kept as device tensors until the end."""

    def __init__(self, traced: TracedModel) -> None:
        self.graph = traced.graph
        self.sq: dict[str, list[Value]] = {}
        self.numel: dict[str, int] = {}
        self.bad_grad: dict[str, list[Flag]] = {}
        self.bad_fwd: dict[str, Flag] = {}
        self.dead: dict[str, torch.Tensor] = {}
        self.saturated: dict[str, torch.Tensor] = {}
        self.forward_order: list[str] = []
        #: id -> (weak reference, version) of tensors already observed, to tell aliases.
        self.outputs: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def observe(self, name: str, value: Any) -> None:
        leaves = [t for t in tensor_leaves(value) if t.is_floating_point()]
        if not leaves:
            return
        self.forward_order.append(name)
        key = node_record(self.graph, name).key
        # The checks are not the model's ops: the runtime recorder (a TorchFunctionMode)
        # must not see them, or its replayed node names (sum, sum_1, ...) would shift.
        with torch.no_grad(), torch._C.DisableTorchFunction():
            bad, active, saturated = forward_checks(key, leaves[0].detach())
            self.bad_fwd[name] = bad
            if active is not None:
                self.dead[name] = active
            if saturated is not None:
                self.saturated[name] = saturated
        self.numel[name] = sum(t.numel() for t in leaves)
        for leaf in leaves:
            seen = self.outputs.get(id(leaf))
            self.outputs[id(leaf)] = (weakref.ref(leaf), leaf._version)
            if seen is not None and seen[0]() is leaf and seen[1] == leaf._version:
                # An alias (nn.Identity, a no-op .to/.contiguous): the same tensor, not
                # modified, has no gradient of its own; measuring it would report the
                # total gradient of the tensor it aliases.
                continue
            if leaf.requires_grad:
                leaf.register_hook(self._hook(name))

    def alias(self, new: torch.Tensor, old: torch.Tensor) -> None:
        """``new`` stands for ``old`` (FSDP passes a module's inputs through an autograd
        function of its own): an op returning it unchanged is an alias, as of ``old``."""
        seen = self.outputs.get(id(old))
        if seen is not None and seen[0]() is old:
            self.outputs[id(new)] = (weakref.ref(new), new._version)

    def _hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor | None) -> None:
            if grad is None:
                # An output of a multi-output op (``chunk``, ``split``) that nothing reads
                # gets no gradient: autograd calls the hook with None. It adds nothing.
                return
            g = grad.detach()
            total = sq_sum(g)
            # Squares of float32/16 values summed in float64 cannot overflow: the sum is
            # non-finite exactly when some element is, so it doubles as the check.
            sq: Value
            bad: Flag
            if g.device.type == "cpu":  # see Value; the check on the Python float
                sq = float(total)
                bad = _nonfinite(g) if g.dtype == torch.float64 else not math.isfinite(sq)
            else:
                sq = total
                bad = _nonfinite(g) if g.dtype == torch.float64 else ~torch.isfinite(total)
            self.sq.setdefault(name, []).append(sq)
            self.bad_grad.setdefault(name, []).append(bad)

        return hook


#: Elements per chunk of the CPU reduction below: 512 KB in float64, which stays in
#: cache, where one float64 copy of a large tensor costs fresh pages every time.
_CHUNK = 1 << 16


def sq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``t`` accumulated in float64, as a 0-dim float64 tensor.

    ``vector_norm(t, dtype=float64)`` converts the whole tensor to a float64 copy
    first; on the CPU that copy (twice the tensor's size, in fresh pages) costs
    more than the reduction, so large contiguous CPU tensors go chunk by chunk.
    """
    t = t.detach()
    if t.device.type != "cpu" or t.numel() <= _CHUNK or not t.is_contiguous():
        return torch.linalg.vector_norm(t, 2, dtype=torch.float64) ** 2
    parts = []
    for chunk in t.view(-1).split(_CHUNK):
        c64 = chunk.to(torch.float64)
        parts.append(torch.dot(c64, c64))
    return torch.stack(parts).sum()


def forward_checks(key: str, y: torch.Tensor,
                   ) -> tuple[Flag, torch.Tensor | None, torch.Tensor | None]:
    """One output's forward checks, for the probe and the watch (``gradscope.watching``):
    whether it has a non-finite element; for a ReLU-like op (``key``), which units are
    active on some sample (a bool tensor over the units); for a sigmoid/tanh-like one,
    the share of outputs in the flat tails. Call under ``torch.no_grad()``."""
    bad = _nonfinite(y)
    if key in DEAD_KEYS and y.dim() >= 1 and y.shape[0] > 0:
        # On the CPU, for a finite output, "max > 0" is the same test and an order of
        # magnitude faster than any(y > 0).
        if y.device.type == "cpu" and not bool(bad):
            return bad, y.amax(dim=0) > 0, None
        return bad, (y > 0).any(dim=0), None
    if key in SATURATION_KEYS:
        return bad, None, _saturated(key, y)
    return bad, None, None


def _nonfinite(t: torch.Tensor) -> Flag:
    """Whether ``t`` has a non-finite element: a bool on the CPU, else a 0-dim tensor.

    On the CPU, a finite sum proves every element finite (an inf or NaN element
    makes the sum inf or NaN), and the sum needs no full-size temporary; only a
    non-finite sum (an overflow, or a real inf/NaN) takes the elementwise test.
    Elsewhere the elementwise test runs on the device without a sync.
    """
    if t.device.type != "cpu":
        return ~torch.isfinite(t).all()
    if t.dtype in (torch.float32, torch.float64) and math.isfinite(float(t.sum())):
        return False
    return not bool(torch.isfinite(t).all())


def _total(values: list[Value]) -> float:
    """The sum of a node's per-hook figures, read from the device once."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return float(torch.stack(values).sum())  # type: ignore[arg-type]
    return float(sum(float(v) for v in values))


def _any(flags: list[Flag]) -> bool:
    if all(isinstance(f, torch.Tensor) for f in flags):
        return bool(torch.stack(flags).any())  # type: ignore[arg-type]
    return any(bool(f) for f in flags)


def _saturated(key: str, y: torch.Tensor) -> torch.Tensor:
    y = y.float()
    if key == "activation:sigmoid":
        flat = y * (1 - y) < 0.01 * 0.25
    elif key == "activation:tanh":
        flat = 1 - y * y < 0.01
    elif key == "activation:softsign":
        flat = (1 - y.abs()) ** 2 < 0.01
    elif key == "activation:hardsigmoid":
        flat = (y <= 0) | (y >= 1)
    else:  # hardtanh: derivative 0 at the clamps
        flat = (y <= y.min()) | (y >= y.max())
    return flat.float().mean()


def _param_table(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _weights_of(names: Sequence[str], params: dict[str, nn.Parameter]) -> list[str]:
    """The node's weights: matrices and kernels, else whatever parameters it has."""
    known = [n for n in dict.fromkeys(names) if n in params]
    weights = [n for n in known if params[n].dim() >= 2 or n.rsplit(".", 1)[-1] == "weight"]
    return weights or known


def _node_weights(traced: TracedModel, params: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    """Compute nodes with trainable weights, and the weights their ratios are measured on."""
    found: dict[str, list[str]] = {}
    for name in traced.graph.nodes:
        names = node_record(traced.graph, name).params
        if not names or node_record(traced.graph, name).role != "compute":
            continue
        weights = _weights_of(names, params)
        if not weights:
            continue
        if not any(params[w].requires_grad for w in weights):
            continue  # frozen weights: nothing to report
        found[name] = weights
    return found


def first_update_sq(grad: torch.Tensor, weight: torch.Tensor, lr: float, optimizer: str,
                    weight_decay: float = 0.0, eps: float = 1e-8) -> float:
    """Squared norm of the optimiser's first step, computed without taking it.

    SGD moves by lr * g. Adam's first step divides g by sqrt(g^2) + eps, so each
    element with a gradient moves by ~lr; AdamW adds decoupled decay lr * wd * W.
    """
    g = grad.detach().to(torch.float64)
    if optimizer == "sgd":
        step = lr * (g + weight_decay * weight.detach().to(torch.float64))
    else:
        if optimizer == "adam" and weight_decay:
            g = g + weight_decay * weight.detach().to(torch.float64)
        step = lr * g / (g.abs() + eps)
        if optimizer == "adamw" and weight_decay:
            step = step + lr * weight_decay * weight.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(step) ** 2)


LOSSES = ("dot", "sum", "mse", "cross_entropy")
#: ``loss_fn(output, inputs)``, or ``loss_fn(output, inputs, target)`` with real batches.
LossFn = Callable[..., torch.Tensor]
#: One batch of real data: the model's positional inputs and its target (labels, next
#: tokens ...), as a model file's ``example_batches()`` gives them.
RealBatch = tuple[tuple[Any, ...], Any]

#: The no-target marker of synthetic batches (a real target may be anything, None too).
NO_TARGET: Any = object()


def loss_description(loss: str | LossFn, real: bool) -> str:
    """How the probe's loss is named in the report."""
    if callable(loss):
        return "loss_fn(output, inputs, target)" if real else "loss_fn(output, inputs)"
    return _loss(torch.zeros(2, 2), (), loss, 0)[1]


def make_batches(inputs: tuple[Any, ...], count: int, seed: int) -> list[tuple[Any, ...]]:
    """The example inputs and ``count - 1`` more batches like them, drawn with a fixed seed.

    Floating inputs are matched to the example's mean and standard deviation,
    integer inputs (token ids) to its range, booleans to its share of True, so
    the extra batches exercise the model the way the example does.
    """
    batches = [tuple(inputs)]
    for k in range(1, count):
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        batch: list[Any] = []
        for t in inputs:
            if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.is_meta:
                batch.append(t)
            elif t.is_floating_point():
                ref = t.detach().to(torch.float64)
                std = float(ref.std()) if t.numel() > 1 else 0.0
                draw = torch.randn(t.shape, generator=generator, dtype=torch.float64)
                batch.append((draw * std + float(ref.mean())).to(device=t.device, dtype=t.dtype))
            elif t.dtype == torch.bool:
                share = float(t.float().mean())
                draw = torch.rand(t.shape, generator=generator) < share
                batch.append(draw.to(t.device))
            elif t.is_complex():
                batch.append(t)
            else:
                lo, hi = int(t.min()), int(t.max())
                draw = torch.randint(lo, hi + 1, t.shape, generator=generator)
                batch.append(draw.to(device=t.device, dtype=t.dtype))
        batches.append(tuple(batch))
    return batches


def _loss(out: torch.Tensor, inputs: tuple[Any, ...], loss: str | LossFn, seed: int,
          target: Any = NO_TARGET, drawn: dict[Hashable, torch.Tensor] | None = None,
          ) -> tuple[torch.Tensor, str]:
    """The probe's loss and how it is described in the report.

    A function gets the batch's target as a third argument when the batch is real
    (``example_batches()``); synthetic batches have none, and it gets two.

    The seeded direction or target is the same draw for every batch of one probe (its
    generator is seeded alike each time): ``drawn`` keeps it across the batches, where
    drawing it again cost 26-35 ms a batch on a language model's logits (issue 15).
    """
    if callable(loss):
        real = target is not NO_TARGET
        value = loss(out, inputs, target) if real else loss(out, inputs)
        described = loss_description(loss, real)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ModelRunError(f"{described} must return a scalar tensor",
                                "return e.g. F.cross_entropy(output, target)")
        return value.reshape(()), described
    if loss == "sum":
        return out.sum(), "sum(output)"
    if loss == "cross_entropy" and out.dim() < 2:
        raise ModelRunError("--loss cross_entropy needs an output with a class dimension",
                            "use --loss dot or mse for this output")
    key = (loss, seed, tuple(out.shape), out.dtype, str(out.device))
    draw = None if drawn is None else drawn.get(key)
    if draw is None:
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        if loss == "cross_entropy":
            rows = out.numel() // out.shape[-1]
            draw = torch.randint(0, out.shape[-1], (rows,), generator=generator)
            draw = draw.to(out.device)
        else:  # mse's target, dot's direction
            draw = torch.randn(out.shape, generator=generator, dtype=torch.float32)
            draw = draw.to(device=out.device, dtype=out.dtype)
        if drawn is not None:
            drawn[key] = draw
    if loss == "mse":
        return torch.nn.functional.mse_loss(out, draw), "mse(output, seeded target)"
    if loss == "cross_entropy":
        logits = out.reshape(-1, out.shape[-1])
        return (torch.nn.functional.cross_entropy(logits.float(), draw),
                "cross_entropy(output, seeded classes over the last dim)")
    return (out * draw).sum(), "dot(output, seeded direction)"


@dataclass
class _Batch:
    """One batch's forward and backward, kept until all batches are combined."""

    acc: _Accumulator
    out_sq: float
    out_numel: int
    #: id(parameter) -> (||grad||^2, ||first update||^2 or 0.0), None where unused.
    #: Reduced as soon as the batch is done, so no batch's gradients outlive it.
    param_stats: dict[int, tuple[float, float] | None]
    size: int | None
    differentiable: bool


def _batch_size(inputs: tuple[Any, ...]) -> int | None:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def _halve(inputs: tuple[Any, ...], size: int) -> tuple[Any, ...]:
    half = max(size // 2, 1)
    return tuple(t[:half] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size
                 else t for t in inputs)


def _halve_target(target: Any, size: int) -> Any:
    """A real batch's target cut with its inputs: tensors (or a tuple of them) of that size."""
    if isinstance(target, torch.Tensor):
        return _halve((target,), size)[0]
    if isinstance(target, tuple):
        return _halve(target, size)
    return target


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError",
                                                              None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


class _Expired(BaseException):
    """Raised at a node boundary once the deadline has passed; caught by :func:`run_probe`.

    A BaseException, like KeyboardInterrupt, so that neither the model's own
    ``except Exception`` nor the tracers' error wrapping can swallow or rename it.
    """


def _run_batch(model: nn.Module, traced: TracedModel, inputs: tuple[Any, ...], device: str,
               loss: str | LossFn, seed: int, wanted: list[nn.Parameter],
               measured: set[int], update: tuple[float | None, str, float],
               deadline: Deadline | None = None, plain_inputs: bool = False,
               target: Any = NO_TARGET, streamer: StreamHooks | None = None,
               sharded: ShardHooks | None = None,
               drawn: dict[Hashable, torch.Tensor] | None = None) -> _Batch:
    probe_inputs = []
    grad_inputs: list[torch.Tensor] = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t = t.detach().to(device)
            if plain_inputs:  # leaves the forward may mark requires_grad itself
                probe_inputs.append(t.clone())
                continue
            if t.is_floating_point():
                grad_inputs.append(t.requires_grad_(True))
            # The model gets a non-leaf copy: a forward may modify its input in place
            # (nn.ReLU(inplace=True) first), which autograd refuses on a leaf.
            t = t.clone()
        probe_inputs.append(t)
    acc = _Accumulator(traced)
    observe = acc.observe
    if deadline is not None and deadline.seconds is not None:
        def observe(name: str, value: Any) -> None:
            acc.observe(name, value)
            if deadline.expired():
                raise _Expired

    # The streamed probe's blocks stay checkpointed through the backward; FSDP's inputs
    # are paired with the tensors they stand for while the forward runs.
    context: AbstractContextManager[None] = (
        streamer.running() if streamer is not None
        else sharded.linking(acc) if sharded is not None else nullcontext())
    with context:
        out = traced.runner.run(tuple(probe_inputs), observe)
        if not out.requires_grad:
            return _Batch(acc, 0.0, out.numel(), {}, _batch_size(inputs), False)
        value, _ = _loss(out, tuple(probe_inputs), loss, seed,
                         target if target is NO_TARGET else to_device(target, device), drawn)
        if streamer is not None:
            out_grad, param_stats = _backward_streamed(value, out, grad_inputs, wanted,
                                                       measured, update)
        elif sharded is not None:
            out_grad, param_stats = _backward_sharded(value, out, sharded, wanted,
                                                      measured, update)
            sharded.reduce_nodes(acc.sq, acc.forward_order)
        else:
            out_grad, param_stats = _backward(value, out, grad_inputs, wanted, measured,
                                              update)
    name = traced.output_node
    if name not in acc.sq and out_grad is not None:
        acc._hook(name)(out_grad)  # the aliased output's own row: the same gradient
    out_sq = _total(acc.sq[name]) if name in acc.sq else 0.0
    return _Batch(acc, out_sq, acc.numel.get(name, out.numel()), param_stats,
                  _batch_size(inputs), True)


def _backward(value: torch.Tensor, out: torch.Tensor, grad_inputs: list[torch.Tensor],
              wanted: list[nn.Parameter], measured: set[int],
              update: tuple[float | None, str, float],
              ) -> tuple[torch.Tensor | None, dict[int, tuple[float, float] | None]]:
    """dLoss/d(output), and (||grad W||^2, ||first update||^2) per measured parameter."""
    # dLoss/d(output) itself, not only through the output node's hook: an output that is
    # an alias of an earlier tensor (``logits.float()`` on float logits, nn.Identity) has
    # no hook of its own, and without its gradient no figure could be normalised.
    targets: list[torch.Tensor] = [out, *grad_inputs, *wanted]
    grads = torch.autograd.grad(value, targets, allow_unused=True)
    out_grad, grads = grads[0], grads[1:]
    param_stats: dict[int, tuple[float, float] | None] = {}
    for p, g in zip(wanted, grads[len(grad_inputs):], strict=True):
        if id(p) in measured:
            param_stats[id(p)] = None if g is None else _param_stats(g, p, update)
    return out_grad, param_stats


def _backward_sharded(value: torch.Tensor, out: torch.Tensor, sharded: ShardHooks,
                      wanted: list[nn.Parameter], measured: set[int],
                      update: tuple[float | None, str, float],
                      ) -> tuple[torch.Tensor | None, dict[int, tuple[float, float] | None]]:
    """:func:`_backward` on an FSDP model (``--distributed``): ``backward()``, in which FSDP
    reduce-scatters the weight gradients into the shards, then the shards' figures."""
    captured: list[torch.Tensor] = []
    handle = out.register_hook(lambda g: captured.append(g.detach()))
    try:
        value.backward()
    finally:
        handle.remove()
    return (captured[0] if captured else None), sharded.param_stats(wanted, measured, update)


def _param_stats(grad: torch.Tensor, p: torch.Tensor,
                 update: tuple[float | None, str, float]) -> tuple[float, float]:
    lr, optimizer, weight_decay = update
    return (float(sq_sum(grad)),
            first_update_sq(grad, p, lr, optimizer, weight_decay) if lr is not None else 0.0)


def _backward_streamed(value: torch.Tensor, out: torch.Tensor, grad_inputs: list[torch.Tensor],
                       wanted: list[nn.Parameter], measured: set[int],
                       update: tuple[float | None, str, float],
                       ) -> tuple[torch.Tensor | None, dict[int, tuple[float, float] | None]]:
    """:func:`_backward` without holding every weight gradient at once (``--stream``).

    ``autograd.grad`` returns all of them together: a whole model's worth. Here each
    parameter's gradient is reduced as soon as it is accumulated, while its block's
    weights are still materialised, and dropped.
    """
    param_stats: dict[int, tuple[float, float] | None] = \
        {id(p): None for p in wanted if id(p) in measured}
    captured: list[torch.Tensor] = []

    def reduce(p: torch.Tensor) -> None:
        if p.grad is not None and id(p) in param_stats:
            param_stats[id(p)] = _param_stats(p.grad, p, update)
        p.grad = None

    saved = [(p, p.grad) for p in wanted]
    handles = [out.register_hook(lambda g: captured.append(g.detach()))]
    try:
        for p in wanted:
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(reduce))
        torch.autograd.backward(value, inputs=[*grad_inputs, *wanted] or None)
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in saved:
            p.grad = grad
    return (captured[0] if captured else None), param_stats


def run_probe(model: nn.Module, traced: TracedModel, inputs: tuple[Any, ...], device: str,
              seed: int = 0, lr: float | None = None, optimizer: str = "sgd",
              weight_decay: float = 0.0, batches: int = 3, loss: str | LossFn = "dot",
              mode: str = "train", deadline: Deadline | None = None,
              real_batches: Sequence[RealBatch] | None = None,
              streamer: StreamHooks | None = None,
              sharded: ShardHooks | None = None) -> ProbeResult:
    """Forward and backward on ``batches`` seeded batches; the caller restores the model.

    ``real_batches`` (``example_batches()``: (inputs, target) pairs of real data) are
    probed instead of synthetic ones, the first ``batches`` of them, a callable
    ``loss`` then taking the target as its third argument.

    Every node's squared gradient norm is summed over the batches (so the
    reported RMS is over all probe samples) and its per-batch RMS is kept for
    the spread. On CUDA out-of-memory the batch is halved and retried, down to 1.

    ``deadline`` (``--timeout``) is checked after every forward node and before
    every batch; once it has passed, the batch under way is dropped and the
    result holds the batches finished so far, with a note. With none finished the
    result has ``batches == 0`` and no figures: the caller reports the static
    estimate alone, which is more use to a CI job than an error.
    """
    if mode == "eval":
        model.eval()
    else:
        model.train()
    if not callable(loss) and loss not in LOSSES:
        raise ModelRunError(f"unknown loss {loss!r}", f"choose one of {', '.join(LOSSES)}")
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    params = _param_table(model)
    wanted = [p for p in dict.fromkeys(params.values()) if p.requires_grad]
    measured = {id(params[w]) for ws in _node_weights(traced, params).values() for w in ws}
    done: list[_Batch] = []
    drawn: dict[Hashable, torch.Tensor] = {}  # the loss's seeded draw, alike for every batch
    notes: list[str] = []
    working: int | None = None  # batch size that fit after halving, kept for later batches
    stopped = False
    plain_inputs = False  # the model sets requires_grad on its own inputs: leave them alone
    planned: list[tuple[tuple[Any, ...], Any]] = \
        [(tuple(b), NO_TARGET) for b in make_batches(inputs, max(batches, 1), seed)] \
        if not real_batches else [(tuple(x), y) for x, y in real_batches[:max(batches, 1)]]
    for batch, target in planned:
        if deadline is not None and deadline.expired():
            stopped = True
            break
        while working is not None and (_batch_size(batch) or 0) > working:
            size = _batch_size(batch) or 1
            batch, target = _halve(batch, size), _halve_target(target, size)
        while True:
            try:
                done.append(_run_batch(model, traced, batch, device, loss, seed, wanted,
                                       measured, (lr, optimizer, weight_decay), deadline,
                                       plain_inputs, target, streamer, sharded, drawn))
                if notes:
                    working = _batch_size(batch)
                break
            except _Expired:
                stopped = True
                break
            except NodeExecutionError as exc:
                if _is_oom(exc.error):
                    target = _halve_target(target, _batch_size(batch) or 1)
                    batch = _retry_smaller(batch, exc.error, notes)
                    continue
                if not plain_inputs and _sets_requires_grad(exc.error):
                    plain_inputs = True
                    notes.append(_PLAIN_INPUTS_NOTE)
                    continue
                raise ModelRunError(
                    f"the model raised during the probe at node {exc.node.name}: "
                    f"{type(exc.error).__name__}: {exc.error}",
                    model_error_hint(exc.error)
                    or "fix the forward, or use --no-probe for the static estimate") from exc
            except ModelRunError:
                raise
            except Exception as exc:
                if _is_oom(exc):
                    target = _halve_target(target, _batch_size(batch) or 1)
                    batch = _retry_smaller(batch, exc, notes)
                    continue
                if not plain_inputs and _sets_requires_grad(exc):
                    plain_inputs = True
                    notes.append(_PLAIN_INPUTS_NOTE)
                    continue
                raise ModelRunError(
                    f"the model raised during the probe: {type(exc).__name__}: {exc}",
                    model_error_hint(exc)
                    or "fix the forward, or use --no-probe for the static estimate") from exc
        if stopped:
            break
    description = loss_description(loss, bool(real_batches))
    result = ProbeResult(device=device, batch_size=_batch_size(planned[0][0]), loss=description,
                         seed=seed,
                         mode=mode, lr=lr, optimizer=optimizer if lr else None,
                         batches=len(done))
    result.notes.extend(notes)
    if real_batches:
        result.notes.append(
            f"the probe ran on {len(planned)} real batch(es) of the {len(real_batches)} "
            "given (example_batches), not on synthetic ones")
    if stopped and deadline is not None:
        result.notes.append(
            f"probe stopped after {len(done)} of {max(batches, 1)} batches: --timeout "
            f"{deadline.seconds:g} s" + ("" if done else "; the report has the static "
                                          "estimate only"))
    if not done:
        return result
    _combine(done, traced, params, result, lr, optimizer, weight_decay,
             streamer.weight_sq if streamer is not None
             else sharded.weight_sq if sharded is not None else None)
    _absolute_scale(done, traced, params, result, mean_loss=callable(loss)
                    or loss in ("mse", "cross_entropy"))
    _contain_nonfinite(traced, result)
    return result


def _contain_nonfinite(traced: TracedModel, result: ProbeResult) -> None:
    """Set aside non-finite forward values that never reached the output or a gradient.

    T5 takes ``log`` of relative positions that include 0 and discards the ``-inf``
    with ``torch.where``: the loss and every gradient stay finite, so nothing the
    training run sees is affected. A NaN/Inf matters when it reaches the differentiated
    output or any gradient; only then is it reported (GS501/GS502).
    """
    if not result.nonfinite_forward or result.nonfinite_backward \
            or traced.output_node in result.nonfinite_forward:
        return
    first = result.nonfinite_forward[0]
    result.contained_nonfinite = result.nonfinite_forward
    result.nonfinite_forward = []
    result.notes.append(
        f"non-finite values appeared in the forward pass at {traced.node(first).label()} "
        f"({len(result.contained_nonfinite)} node(s)) but reached neither the output nor "
        "any gradient (masked, as torch.where does): not a finding")


_PLAIN_INPUTS_NOTE = ("the model sets requires_grad on its own input (as Wav2Vec2's feature "
                      "encoder does), so the probe passed its inputs as plain tensors and "
                      "measured no gradient with respect to them")


def _sets_requires_grad(error: BaseException) -> bool:
    """The model's forward set ``requires_grad`` on a view of the probe's input copy."""
    return isinstance(error, RuntimeError) and \
        "requires_grad flags of leaf variables" in str(error)


def _retry_smaller(batch: tuple[Any, ...], error: BaseException,
                   notes: list[str]) -> tuple[Any, ...]:
    size = _batch_size(batch)
    if size is None or size <= 1:
        raise ModelRunError(
            f"out of memory even with a batch of 1: {type(error).__name__}",
            "use --no-probe (or --meta) for the static estimate, or a smaller input") from error
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    notes.append(f"out of memory with a batch of {size}: the probe halved it to "
                 f"{max(size // 2, 1)}")
    return _halve(batch, size)


def _combine(done: list[_Batch], traced: TracedModel, params: dict[str, nn.Parameter],
             result: ProbeResult, lr: float | None, optimizer: str, weight_decay: float,
             weight_sq: dict[int, float] | None = None) -> None:
    """Sum the batches' measurements into the per-node figures of the report.

    ``weight_sq``: ||W||^2 by id(parameter), measured earlier where the weights are
    no longer there to read (the streamed probe frees them).
    """
    for batch in done:
        _finish_forward(batch.acc, result)
    if not any(b.differentiable for b in done):
        result.notes.append("the probed output does not depend on any trainable tensor: "
                            "no gradient to measure")
        return
    usable = [b for b in done if b.differentiable]
    out_sq = sum(b.out_sq for b in usable)
    out_numel = sum(b.out_numel for b in usable)
    if not math.isfinite(out_sq) or out_sq <= 0:
        result.notes.append("the gradient at the model output is zero or non-finite")
        return
    result.output_grad_rms = math.sqrt(out_sq / max(out_numel, 1))
    order = list(dict.fromkeys(n for b in usable for n in b.acc.forward_order))
    for name in order:
        parts = [(b, _total(b.acc.sq[name])) for b in usable if name in b.acc.sq]
        if not parts:
            continue
        bad = any(_any(b.acc.bad_grad[name]) for b, _ in parts)
        sq = sum(v for _, v in parts)
        if bad or not math.isfinite(sq):
            result.nonfinite_backward.append(name)
            result.sq_norm[name] = math.nan
            result.grad_rms[name] = math.nan
            continue
        numel = sum(b.acc.numel.get(name, 1) for b, _ in parts)
        result.sq_norm[name] = sq / out_sq
        result.grad_rms[name] = math.sqrt(sq / numel) / result.output_grad_rms
        per_batch = []
        for b, v in parts:
            rms_out = math.sqrt(b.out_sq / max(b.out_numel, 1))
            if rms_out > 0:
                per_batch.append(math.sqrt(v / b.acc.numel.get(name, 1)) / rms_out)
        if len(per_batch) > 1:
            result.grad_rms_range[name] = (min(per_batch), max(per_batch))
    for b in usable:
        total = sum(stats[0] for stats in b.param_stats.values() if stats is not None)
        if math.isfinite(total):
            result.batch_grad_norms.append(math.sqrt(total))
    # a weight shared by several nodes is measured once
    w_sqs: dict[int, float] = dict(weight_sq or {})
    for name, weights in _node_weights(traced, params).items():
        w_sq = 0.0
        for w in weights:
            p = params[w]
            if id(p) not in w_sqs:
                w_sqs[id(p)] = float(sq_sum(p))
            w_sq += w_sqs[id(p)]
        g_sq = u_sq = 0.0
        for b in usable:
            for wname in weights:
                stats = b.param_stats.get(id(params[wname]))
                if stats is None:
                    continue
                g_sq += stats[0]
                if lr is not None:
                    u_sq += stats[1]
        g_sq /= len(usable)  # mean over batches: the figure of one typical step
        u_sq /= len(usable)
        result.param_grad_norm[name] = math.sqrt(g_sq)
        result.param_grad_ratio[name] = math.sqrt(g_sq / w_sq) if w_sq > 0 else None
        if lr is not None:
            result.update_ratio[name] = math.sqrt(u_sq / w_sq) if w_sq > 0 else None


def _absolute_scale(done: list[_Batch], traced: TracedModel, params: dict[str, nn.Parameter],
                    result: ProbeResult, mean_loss: bool) -> None:
    """Each weight's gradient RMS per element on a mean-reduced loss (``param_grad_rms``),
    from the ``param_grad_norm`` that :func:`_combine` measured.

    Relative figures (health, ||grad W||/||W||) do not depend on the loss's scale; Adam's
    epsilon does: it compares each gradient element with 1e-8 in absolute terms. The
    user's loss (and the built-in mean losses) give the absolute scale as it will be in
    training. A synthetic loss's scale is arbitrary (<output, direction> has a unit
    output gradient per element), so it is rescaled to a mean cross-entropy at chance:
    dLoss/dlogit = (p - y) / rows, whose RMS over rows x classes entries is about
    1 / (rows x sqrt(classes)); a mean squared error over the same entries is within a
    factor sqrt(classes) of it.
    """
    usable = [b for b in done if b.differentiable]
    if not usable or result.output_grad_rms is None or result.output_grad_rms <= 0:
        return
    scale = 1.0
    result.grad_scale = "your loss"
    if not mean_loss:
        shape = traced.node(traced.output_node).shape
        numel = max(sum(b.out_numel for b in usable) // len(usable), 1)
        classes = int(shape[-1]) if shape else 1
        rows = max(numel // max(classes, 1), 1)
        scale = 1.0 / (rows * math.sqrt(max(classes, 1))) / result.output_grad_rms
        result.grad_scale = (f"the {result.loss} rescaled to a mean cross-entropy over "
                             f"{rows} rows of {classes} (no loss_fn given)")
    for name, weights in _node_weights(traced, params).items():
        norm = result.param_grad_norm.get(name)  # ||grad W|| of one typical step (_combine)
        numel = sum(params[w].numel() for w in weights)
        result.param_grad_rms[name] = (norm / math.sqrt(numel) * scale
                                       if numel and norm is not None and math.isfinite(norm)
                                       else None)


def _finish_forward(acc: _Accumulator, result: ProbeResult) -> None:
    """Fold one batch's forward checks in: NaN in forward order, units active in any batch."""
    for name in acc.forward_order:
        if bool(acc.bad_fwd[name]) and name not in result.nonfinite_forward:
            result.nonfinite_forward.append(name)
        if name in acc.dead:
            active = acc.dead[name]
            seen = result.active_units.get(name)
            if seen is not None and seen.shape == active.shape:
                active = active | seen
            result.active_units[name] = active
            result.dead_fraction[name] = float(1.0 - active.float().mean())
        if name in acc.saturated:
            share = float(acc.saturated[name].item())
            count = result.saturated_counts.get(name, 0)
            previous = result.saturated_fraction.get(name, 0.0)
            result.saturated_fraction[name] = (previous * count + share) / (count + 1)
            result.saturated_counts[name] = count + 1
