"""Run under torchrun by tests/test_watch_distributed.py: ``gradscope.watch`` across processes.

    torchrun --nproc-per-node 2 tests/workers/distributed_watch.py MODE OUT.json

MODE ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard`` on each block and
the root). Before joining the process group, every process watches the same run in one
process on the whole batch (the reference); then each process trains the same initial
weights on its half of every batch under the watch. Data parallelism averages the halves'
gradients into the whole batch's, so every recorded figure must be the reference's: rank 0
writes the largest relative difference of each kind of figure, and where any differed.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import gradscope  # noqa: E402
from gradscope.steps import TrainingRecord  # noqa: E402

STEPS, EVERY, BATCH = 6, 2, 8


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(10, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
        nn.Linear(32, 3))
    with torch.no_grad():  # some units dead on part of the batch: the "every sample" test
        model[0][0].bias.sub_(0.6)
        model[1][0].weight.mul_(3.0)  # tanh partly saturated
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 10, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def run(model: nn.Module, part: slice) -> TrainingRecord:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradscope.watch(model, opt, every=EVERY, horizon=STEPS) as watch:
        for x, y in batches():
            loss = nn.functional.cross_entropy(model(x[part]), y[part])
            watch.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return watch.record


def differences(a: TrainingRecord, b: TrainingRecord) -> dict[str, Any]:
    worst: dict[str, float] = {}
    where: dict[str, str] = {}

    def see(kind: str, x: float | None, y: float | None, at: str) -> None:
        if x is None or y is None:
            if (x is None) != (y is None):
                worst[kind], where[kind] = math.inf, at
            return
        rel = abs(x - y) / max(abs(x), abs(y), 1e-12)
        if rel > worst.get(kind, -1.0):
            worst[kind], where[kind] = rel, at

    for i, (x, y) in enumerate(zip(a.losses, b.losses, strict=True)):
        see("loss", x, y, f"step {i}")
    for i, (x, y) in enumerate(zip(a.grad_norms, b.grad_norms, strict=True)):
        see("grad_norm", x, y, f"step {i}")
    assert [r.step for r in a.recorded] == [r.step for r in b.recorded]
    for ra, rb in zip(a.recorded, b.recorded, strict=True):
        see("output_grad_rms", ra.output_grad_rms, rb.output_grad_rms, f"step {ra.step}")
        assert sorted(ra.layers) == sorted(rb.layers), (sorted(ra.layers), sorted(rb.layers))
        for name, la in ra.layers.items():
            lb = rb.layers[name]
            for kind in ("grad_rms", "weight_grad_norm", "weight_norm", "update_ratio",
                         "dead_fraction", "saturated_fraction"):
                see(kind, getattr(la, kind), getattr(lb, kind), f"step {ra.step} {name}")
    return {"worst": worst, "where": where, "steps": (a.steps, b.steps),
            "dead": [r.layers["0.1"].dead_fraction for r in b.recorded]}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    reference = run(build(), slice(None))  # one process, the whole batch: no group yet
    dist.init_process_group("gloo")
    doc = _across_processes(mode, reference)
    gc.collect()  # the wrapped models' process-group state goes before the group does
    dist.barrier()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(doc))
    dist.destroy_process_group()


def _across_processes(mode: str, reference: TrainingRecord) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    if mode == "ddp":
        watched: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model:
            fully_shard(block)
        watched = fully_shard(model)
    share = BATCH // world
    record = run(watched, slice(rank * share, (rank + 1) * share))
    doc = differences(reference, _unwrapped(record, mode))
    doc["replay"] = _replay_refused(watched)
    doc["error_notes"] = _closed_by_error(watched)
    doc["alone"] = _watched_alone(rank)
    return doc


def _watched_alone(rank: int) -> int | None:
    """A watch on process zero only, told so: no collective, so no wait for the others."""
    if rank != 0:
        return None
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=1, horizon=3, across_processes=False) as watch:
        for x, y in batches()[:3]:
            loss = nn.functional.cross_entropy(model(x), y)
            watch.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return len(watch.record.recorded)


def _replay_refused(model: nn.Module) -> str:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        gradscope.watch(model, opt, replay=lambda copy, step: torch.zeros(()))
    except ValueError as exc:
        return str(exc)
    return ""


def _closed_by_error(model: nn.Module) -> list[str]:
    """Every process fails inside the watch: it closes without a collective (a process
    waiting in one for a failed peer would hang) and says whose figures it kept."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches()[0]
    try:
        with gradscope.watch(model, opt, every=1, horizon=4) as watch:
            loss = nn.functional.cross_entropy(model(x), y)
            watch.loss(loss)
            loss.backward()
            opt.step()
            raise KeyError("the user's loop fails")
    except KeyError:
        pass
    return list(watch.record.notes)


def _unwrapped(record: TrainingRecord, mode: str) -> TrainingRecord:
    """DDP's module paths carry its ``module.`` prefix: the reference's names."""
    if mode != "ddp":
        return record
    for rec in record.recorded:
        rec.layers = {name.removeprefix("module."): layer for name, layer in rec.layers.items()}
    return record


if __name__ == "__main__":
    main()
