"""The streamed probe (``--stream``): measure a model larger than memory, one block at a time.

``--meta`` predicts a 70B model's gradient flow without allocating it; nothing
measured it, because the probe needs every weight in memory. Streaming needs one
block. The model is built on the meta device with each tensor's initialisation
recorded (``gradscope.meta.recording_init(values=True)``: the init call to replay,
or the value of a small tensor such as a norm's ones). The probe then runs
activation checkpointing's schedule, with weights materialised on demand:

- parts outside the repeated blocks (embeddings, final norm, head) and all buffers
  are materialised once and stay;
- each block's weights exist only while the block runs: its parameters are real
  tensors whose storage is grown and filled (the recorded init, replayed under a
  seed derived from the probe's seed and the tensor's name, so the same weights
  every time) just before its forward, and shrunk to nothing after it;
- the forward keeps only what non-reentrant ``torch.utils.checkpoint`` keeps, the
  block's inputs; the backward reaches each block in reverse, which recomputes its
  forward (materialising it again, with the same values) and frees it once the
  gradient with respect to its inputs is complete.

The probe's own tensor hooks sit on the tensors of the first forward, which is the
autograd graph the backward walks, so every node is measured exactly as by the
in-memory probe. Blocks are the children of the largest container (ModuleList or
Sequential) of same-class modules, or those of the container named by
``stream_blocks``. A model with real weights streams too: weights that are not
on the probe's device are copied there block by block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.errors import InputError, ModelRunError
from gradscope.meta import RECIPE, SHADOW

#: How many tensors a "cannot materialise" error names.
_NAMED = 3


def find_blocks(model: nn.Module, container: str | None = None) -> list[str]:
    """Module paths of the blocks the probe streams, in the order the container holds them.

    Without ``container``: the ModuleList or Sequential whose largest group of
    same-class children holds the most parameters (a decoder's layers, a ResNet
    stage's blocks, a plain MLP's Linear layers); those children.
    """
    if container is not None:
        try:
            holder = model.get_submodule(container)
        except AttributeError as exc:
            raise InputError(f"--stream-blocks {container!r} is not a module of the model",
                             "give the path of the ModuleList that holds the layers, "
                             "e.g. model.layers") from exc
        prefix = f"{container}." if container else ""
        children = [f"{prefix}{name}" for name, _ in holder.named_children()]
        if not children:
            raise InputError(f"--stream-blocks {container!r} has no child modules",
                             "give the path of the ModuleList that holds the layers")
        return children
    best: tuple[int, list[str]] = (0, [])
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        groups: dict[type, list[str]] = {}
        for name, child in module.named_children():
            groups.setdefault(type(child), []).append(f"{path}.{name}" if path else name)
        for paths in groups.values():
            if len(paths) < 2:
                continue
            size = sum(p.numel() for name in paths
                       for p in model.get_submodule(name).parameters())
            if size > best[0]:
                best = (size, paths)
    if not best[1]:
        raise InputError("--stream found no repeated blocks (a ModuleList or Sequential of "
                         "layers of one class holding weights)",
                         "name the container of the layers with --stream-blocks PATH")
    return best[1]


def block_owners(model: nn.Module, blocks: list[str]) -> dict[int, str]:
    """id(parameter) -> the block it belongs to; a parameter also used elsewhere (tied
    across blocks, or with the embedding) belongs to none and stays materialised."""
    uses: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = next((b for b in blocks if name.startswith(b + ".")), "")
        uses.setdefault(id(p), set()).add(owner)
    return {pid: next(iter(found)) for pid, found in uses.items()
            if len(found) == 1 and "" not in found}


def seed_for(seed: int, name: str) -> int:
    """The seed a tensor is drawn with: a function of the probe's seed and its name only,
    so a block materialised again (in the backward) gets exactly the same values."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Slot:
    """One parameter or buffer: where its values come from and the tensor the model uses."""

    name: str
    #: The tensor the model held before (meta, or real on another device).
    original: torch.Tensor
    #: What the model holds during the probe: on the probe's device, storage empty
    #: while its block is not running.
    real: torch.Tensor
    nbytes: int


@dataclass
class Streamer:
    """Materialises and frees blocks during one streamed probe (see the module's doc)."""

    model: nn.Module
    blocks: list[str]
    device: str
    seed: int = 0
    #: id(real parameter) -> ||W||^2, measured when it is first materialised (the
    #: probe's ||grad W||/||W|| needs it after the weights are gone again).
    weight_sq: dict[int, float] = field(default_factory=dict)
    #: Blocks materialised so far, in order (forward and recomputations): tests and the
    #: report's note read it.
    log: list[str] = field(default_factory=list)
    peak_live_blocks: int = 0
    _slots: dict[str, list[_Slot]] = field(default_factory=dict)
    _live: set[str] = field(default_factory=set)
    _saved_forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    # set-up -------------------------------------------------------------
    def prepare(self) -> None:
        """Give every module real tensors on the probe's device: blocks' parameters with
        empty storage, everything else materialised. The caller restores the model's
        ``_parameters``/``_buffers`` afterwards (``gradscope.state.preserved``)."""
        owners = block_owners(self.model, self.blocks)
        missing: list[str] = []
        made: dict[int, _Slot] = {}
        for path, module in self.model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for name, tensor in list(table.items()):
                    if tensor is None or (not tensor.is_meta
                                          and tensor.device == torch.device(self.device)):
                        continue  # already where the probe runs: used as it is
                    qualified = f"{path}.{name}" if path else name
                    slot = made.get(id(tensor))
                    if slot is None:
                        if tensor.is_meta and not hasattr(tensor, RECIPE) \
                                and not hasattr(tensor, SHADOW):
                            missing.append(qualified)
                            continue
                        block = owners.get(id(tensor)) if kind == "_parameters" else None
                        slot = made[id(tensor)] = self._slot(qualified, tensor)
                        if block is None:
                            self._fill(slot)
                        else:
                            self._slots.setdefault(block, []).append(slot)
                    table[name] = slot.real
        if missing:
            shown = ", ".join(missing[:_NAMED]) + (" ..." if len(missing) > _NAMED else "")
            raise ModelRunError(
                f"--stream cannot materialise {len(missing)} tensor(s) built on the meta "
                f"device ({shown}): their values were neither drawn by an init call nor "
                "small enough to be computed alongside",
                "initialise them with torch.nn.init (or in reset_parameters), or probe "
                "without --stream")

    def _slot(self, name: str, tensor: torch.Tensor) -> _Slot:
        real = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        nbytes = real.untyped_storage().nbytes()
        real.untyped_storage().resize_(0)
        if isinstance(tensor, nn.Parameter):
            real = nn.Parameter(real, requires_grad=tensor.requires_grad)
        return _Slot(name, tensor, real, nbytes)

    def _fill(self, slot: _Slot) -> None:
        """Grow the slot's storage and give it its values (the same ones every time)."""
        storage = slot.real.untyped_storage()
        if storage.nbytes() != slot.nbytes:
            storage.resize_(slot.nbytes)
        fill(slot.real, slot.name, slot.original, self.seed)
        if isinstance(slot.real, nn.Parameter) and id(slot.real) not in self.weight_sq:
            from gradscope.probe import sq_sum

            self.weight_sq[id(slot.real)] = float(sq_sum(slot.real))

    # blocks ---------------------------------------------------------------
    def materialise(self, block: str) -> None:
        if block in self._live:
            return
        # Not the model's ops: the runtime recorder (a TorchFunctionMode) running around
        # the block must not see them, or its node names (pow, pow_1, ...) would shift.
        with torch._C.DisableTorchFunction():
            for slot in self._slots.get(block, []):
                self._fill(slot)
        self._live.add(block)
        self.log.append(block)
        self.peak_live_blocks = max(self.peak_live_blocks, len(self._live))

    def release(self, block: str) -> None:
        if block not in self._live:
            return
        for slot in self._slots.get(block, []):
            slot.real.untyped_storage().resize_(0)
        self._live.discard(block)

    def note(self) -> str:
        """What the report says about the streamed probe."""
        largest, kept, _ = stream_footprint(self.model, self.blocks)
        return (f"--stream: the probe materialised the {len(self.blocks)} blocks "
                f"({self.blocks[0]} ... {self.blocks[-1]}) one at a time, "
                f"{len(self.log)} times in all (forward, then again in the backward), each "
                f"weight drawn from its declared initialisation with a seed of its own; at "
                f"most {self.peak_live_blocks} block(s) of up to {largest / 2**30:.3g} GB "
                f"were live beside {kept / 2**30:.3g} GB kept (embeddings, norms, head, "
                "buffers)")

    @contextmanager
    def running(self) -> Iterator[None]:
        """While the probe runs forward and backward: blocks checkpointed and streamed.

        Each block's ``forward`` is replaced on the instance (the module's hooks, the
        runtime recorder's included, still run around it) and put back afterwards.
        """
        from torch.utils.checkpoint import checkpoint

        for path in self.blocks:
            module = self.model.get_submodule(path)
            own = module.__dict__.get("forward")
            self._saved_forwards.append((module, own))
            module.forward = self._streamed(path, module.forward, checkpoint)
        try:
            yield
        finally:
            for module, own in self._saved_forwards:
                if own is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = own
            self._saved_forwards.clear()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for block in list(self._live):
                self.release(block)

    def _streamed(self, path: str, forward: Any, checkpoint: Any) -> Any:
        from gradscope.tracing.graph import tensor_leaves

        def run(*args: Any, **kwargs: Any) -> Any:
            self.materialise(path)
            return forward(*args, **kwargs)

        def streamed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                try:
                    return run(*args, **kwargs)
                finally:
                    self.release(path)
            out = checkpoint(run, *args, use_reentrant=False, **kwargs)
            self.release(path)
            needing = [t for t in tensor_leaves((args, kwargs)) if t.requires_grad]
            if needing:
                # Once the gradient with respect to every input of the block is complete,
                # no node of the block is left to run: its recomputed weights can go.
                self._handles.append(torch.autograd.graph.register_multi_grad_hook(
                    needing, lambda _grads: self.release(path)))
            return out

        return streamed


def fill(target: torch.Tensor, name: str, source: torch.Tensor, seed: int) -> None:
    """Give ``target`` (real, ``source``'s shape) the values ``source`` stands for.

    ``source`` real: its values. On the meta device: its recorded init call replayed
    under the seed of (``seed``, ``name``), or the value computed alongside while the
    model was built. The same values every time, in every process.
    """
    device = str(target.device)
    with torch.no_grad():
        if not source.is_meta:
            target.copy_(source)
        elif hasattr(source, SHADOW) and not hasattr(source, RECIPE):
            target.copy_(getattr(source, SHADOW))
        else:
            func, args, kwargs = getattr(source, RECIPE)
            own = seed_for(seed, name)
            # A generator the model passed (``init.normal_(w, generator=g)``) has moved
            # on since: a fresh one with the tensor's seed draws the same values each time.
            args = tuple(_own_generator(a, own, device) for a in args)
            kwargs = {k: _own_generator(v, own, device) for k, v in kwargs.items()}
            cuda = [target.device.index or 0] if target.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(own)
                func(target, *args, **kwargs)


def _own_generator(value: Any, seed: int, device: str) -> Any:
    if isinstance(value, torch.Generator):
        return torch.Generator(device=device).manual_seed(seed)
    return value


def stream_footprint(model: nn.Module, blocks: list[str]) -> tuple[int, int, int]:
    """Bytes the streamed probe holds: (largest block's parameters, what stays materialised,
    gradients of what stays), for the memory check before anything is allocated."""
    shared = block_owners(model, blocks)
    per_block: dict[str, int] = {}
    kept = kept_grads = 0
    for t in dict.fromkeys([*model.parameters(), *model.buffers()]):
        size = t.numel() * t.element_size()
        if id(t) in shared:
            per_block[shared[id(t)]] = per_block.get(shared[id(t)], 0) + size
        else:
            kept += size
            if isinstance(t, nn.Parameter) and t.requires_grad:
                kept_grads += size
    return max(per_block.values(), default=0), kept, kept_grads


def memory_alternatives(model: nn.Module, container: str | None = None,
                        processes: int = 8) -> str | None:
    """What ``--stream`` and ``--distributed`` would hold, for the memory check's hint;
    None when the model has no repeated blocks to stream or shard."""
    try:
        blocks = find_blocks(model, container)
    except InputError:
        return None
    largest, kept, kept_grads = stream_footprint(model, blocks)
    params = list(dict.fromkeys(model.parameters()))
    total = sum(p.numel() * p.element_size() for p in params)
    gb = 2 ** 30
    return (f"probe it with --stream (about {(largest + kept + kept_grads) / gb:.3g} GB: one "
            f"of its {len(blocks)} blocks at a time, {largest / gb:.3g} GB, beside "
            f"{kept / gb:.3g} GB kept) or with --distributed under torchrun (about "
            f"{(2 * total / processes + 2 * largest) / gb:.3g} GB per process on "
            f"{processes}: a shard of the weights and gradients and one gathered block)")


def materialise_all(model: nn.Module, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The meta model with every tensor materialised as the streamed probe draws it.

    For tests and comparisons: the in-memory probe of the result measures what
    ``--stream`` measures on the meta model, on the same weights.
    """
    streamer = Streamer(model, [], device, seed)
    streamer.prepare()
    return model
