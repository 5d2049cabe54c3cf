"""The probe across processes (``--distributed``): FSDP2 shards, torch.distributed reductions.

``torchrun --nproc-per-node N -m gradscope analyze model.py --distributed``: every
process builds the model on the meta device with its initialisations recorded (as
``--stream`` does), a twin of it is sharded with FSDP2 (``fully_shard`` on each block,
then on the root) over the process group, and each process materialises only its
shard of every weight: the full tensor is drawn from its recorded initialisation with
the tensor's own seed (``gradscope.streaming.seed_for``), so every process agrees on
it, and the process keeps its rows. FSDP2 gathers each block's weights for its
forward and backward and frees them after; gradients are reduce-scattered into the
shards.

Every process runs the same probe batches (FSDP needs them in lockstep, and the
figures are then those of the in-memory probe, not of a smaller per-process batch).
What is sharded is reduced through collectives: ||W||^2, ||grad W||^2 and the first
update's norm are sums over the shards (``all_reduce``); the per-node figures, which
every process measures on the whole batch, are averaged over the group (a check as
much as a reduction: they agree). gloo on the CPU, NCCL on GPUs; rank 0 writes the
report.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradscope.errors import ConfigError
from gradscope.meta import RECIPE, SHADOW
from gradscope.streaming import fill
from gradscope.tracing.graph import TracedModel
from gradscope.tracing.runtime import RuntimeRunner


def setup(device: str) -> str:
    """Join the process group torchrun describes; the device this process probes on.

    ``device`` auto/cuda: NCCL, one GPU per process (``LOCAL_RANK``); cpu: gloo.
    """
    if not dist.is_available():
        raise ConfigError("--distributed needs torch.distributed, which this torch lacks",
                          "install a torch build with distributed support")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ConfigError("--distributed runs under torchrun (no WORLD_SIZE/RANK set)",
                              "torchrun --nproc-per-node N -m gradscope analyze MODEL "
                              "--distributed")
        cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class Sharded:
    """A twin of a meta model, sharded over the process group and materialised shard-wise."""

    model: nn.Module
    traced: TracedModel
    device: str
    #: id(sharded parameter) -> ||W||^2 summed over the shards.
    weight_sq: dict[int, float] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return dist.get_world_size()

    def note(self, blocks: list[str]) -> str:
        """What the report says about the distributed probe."""
        backend = dist.get_backend()
        return (f"--distributed: the probe ran on {self.world} processes ({backend}), the "
                f"model sharded with FSDP2 over {len(blocks)} blocks ({blocks[0]} ... "
                f"{blocks[-1]}) and the root, each weight drawn from its declared "
                "initialisation with a seed of its own; every process ran the same batches, "
                "weight figures summed over the shards and per-node figures averaged over "
                "the processes")

    @contextmanager
    def linking(self, acc: Any) -> Iterator[None]:
        """While the probe's forward runs: FSDP's new input tensors count as the old.

        FSDP2 passes each sharded module's inputs through an autograd function (its
        post-backward hook), so a module returning its input unchanged (nn.Identity, a
        shortcut) hands back a tensor the in-memory probe would recognise as an alias
        and not measure. Two pre-hooks, one before and one after FSDP's, pair them.
        """
        from torch.distributed.fsdp import FSDPModule

        from gradscope.tracing.graph import tensor_leaves

        handles = []
        for module in self.model.modules():
            if not isinstance(module, FSDPModule):
                continue
            before: list[list[torch.Tensor]] = []

            def first(_m: Any, args: Any, kwargs: Any,
                      before: list[list[torch.Tensor]] = before) -> None:
                before.append(tensor_leaves((args, kwargs)))

            def last(_m: Any, args: Any, kwargs: Any,
                     before: list[list[torch.Tensor]] = before) -> None:
                old = before.pop() if before else []
                for new, was in zip(tensor_leaves((args, kwargs)), old, strict=False):
                    if new is not was:
                        acc.alias(new, was)

            handles.append(module.register_forward_pre_hook(first, prepend=True,
                                                            with_kwargs=True))
            handles.append(module.register_forward_pre_hook(last, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def param_stats(self, wanted: list[nn.Parameter], measured: set[int],
                    update: tuple[float | None, str, float],
                    ) -> dict[int, tuple[float, float] | None]:
        """(||grad W||^2, ||first update||^2) per measured parameter, over all shards.

        Reads the gradients FSDP reduce-scattered into the shards (the mean over
        processes of identical gradients: the gradient itself), then clears them.
        """
        from gradscope.probe import _param_stats

        order = [p for p in wanted if id(p) in measured]
        local = torch.zeros(len(order), 3, dtype=torch.float64)
        for i, p in enumerate(order):
            grad = p.grad
            if grad is None:
                continue
            g, w = local_tensor(grad), local_tensor(p)
            local[i, 0], local[i, 1] = _param_stats(g, w, update) if g.numel() else (0.0, 0.0)
            local[i, 2] = 1.0
        for p in wanted:
            p.grad = None
        totals = self._reduce(local, dist.ReduceOp.SUM)
        return {id(p): (float(totals[i, 0]), float(totals[i, 1])) if totals[i, 2] > 0 else None
                for i, p in enumerate(order)}

    def reduce_nodes(self, sq: dict[str, list[Any]], order: list[str]) -> None:
        """Average each node's per-hook squared norms over the group, in place."""
        names = [n for n in order if n in sq]
        if not names:
            return
        sizes = [len(sq[n]) for n in names]
        flat = torch.tensor([float(v) for n in names for v in sq[n]], dtype=torch.float64)
        flat = self._reduce(flat, dist.ReduceOp.SUM) / self.world
        at = 0
        for name, size in zip(names, sizes, strict=True):
            sq[name] = [float(v) for v in flat[at:at + size]]
            at += size

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op)
        return moved.cpu()


def sharded_footprint(model: nn.Module, blocks: list[str]) -> tuple[int, int]:
    """Bytes one process holds, for the memory check: its shard of every weight and
    gradient, plus the largest block gathered whole for its forward and backward."""
    from gradscope.streaming import stream_footprint

    world = dist.get_world_size() if dist.is_initialized() else 1
    largest, _, _ = stream_footprint(model, blocks)
    params = list(dict.fromkeys(model.parameters()))
    total = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return total // world + largest, grads // world + largest


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: a DTensor's local shard (FSDP2), else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_shard(t: torch.Tensor) -> bool:
    """Whether each process holds only a part of ``t`` (a DTensor placed as a shard or a
    partial sum, FSDP2's parameters and gradients), so that its sums over elements are sums
    over processes; a plain or replicated tensor is whole on every process (DDP)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(not p.is_replicate() for p in placements)


def process_group() -> tuple[Any, int] | None:
    """The default process group and its size where torch.distributed runs more than one
    process (torchrun, DDP, FSDP); None in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.group.WORLD, world) if world > 1 else None


def shard(model: nn.Module, traced: TracedModel, blocks: list[str], device: str,
          seed: int) -> Sharded:
    """The sharded twin of ``model`` (meta, with recorded initialisations) on ``device``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    twin = copy.deepcopy(model)  # meta tensors: nothing is copied but the structure
    sources = _sources(model)
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for path in blocks:
        fully_shard(twin.get_submodule(path), mesh=mesh)
    fully_shard(twin, mesh=mesh)
    twin.to_empty(device=device)
    world, me = dist.get_world_size(), dist.get_rank()
    local_sq: dict[str, float] = {}
    with torch.no_grad():
        for kind, named in (("param", twin.named_parameters()), ("buffer", twin.named_buffers())):
            for name, tensor in named:
                source = sources.get(name)
                if source is None:
                    raise ConfigError(f"--distributed cannot materialise {name}: its value "
                                      "was not recorded while the model was built",
                                      "initialise it with torch.nn.init, or probe without "
                                      "--distributed")
                full = _full(name, source, device, seed)
                target = local_tensor(tensor)
                if kind == "param" and getattr(tensor, "placements", None):
                    part = full.chunk(world, dim=0)
                    piece = part[me] if me < len(part) else full[:0]
                    target.copy_(piece.reshape(target.shape))
                else:
                    target.copy_(full)
                if kind == "param":
                    from gradscope.probe import sq_sum

                    local_sq[name] = float(sq_sum(target)) if target.numel() else 0.0
    names = list(local_sq)
    totals = torch.tensor([local_sq[n] for n in names], dtype=torch.float64).to(device)
    dist.all_reduce(totals)
    params = dict(twin.named_parameters())
    sharded = Sharded(twin, replace(traced, runner=RuntimeRunner(
        twin, traced.graph, getattr(traced.runner, "output_key", None),
        skip_distributed=True)), device)
    sharded.weight_sq = {id(params[n]): float(v) for n, v in zip(names, totals.cpu(),
                                                                  strict=True)}
    return sharded


def _sources(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter and buffer of the meta model by name (a deep copy drops the recipes)."""
    found: dict[str, torch.Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_meta or hasattr(tensor, RECIPE) or hasattr(tensor, SHADOW):
            found[name] = tensor
    return found


def _full(name: str, source: torch.Tensor, device: str, seed: int) -> torch.Tensor:
    """The whole tensor ``name`` as the in-memory probe of the same model would hold it."""
    real = torch.empty(source.shape, dtype=source.dtype, device=device)
    fill(real, name, source, seed)
    return real


__all__ = ["Sharded", "rank", "setup", "shard", "sharded_footprint"]
