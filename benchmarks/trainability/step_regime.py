"""Which regime does each run's optimizer step sit in? (docs/watch.md, issue 18)

    HF_HUB_OFFLINE=1 python benchmarks/trainability/step_regime.py            # every run
    HF_HUB_OFFLINE=1 python benchmarks/trainability/step_regime.py gru_pixels lstm_rows

For the first ``--steps`` (50) steps of every run of the trainability benchmark (trained
exactly as ``train.train`` trains them), the loss on the step's own batch after the
optimizer step, against the first-order prediction ``g . (W_after - W_before)``: their
ratio r is 1 where the step is far below the curvature along it (the linear regime; for
SGD, r = 1 - lr * curvature / 2), and negative where the step raises its own batch's loss
(it overshoots). Printed per run: the median r and the number of steps that overshot,
with whether the 300-step run failed and what the before-training analysis said
(docs/trainability.md). Not part of gradscope: it needs the batch again after the step,
which only a ``replay`` could give the watch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))


def regime(arch: str, recipe_name: str, seed: int, steps: int) -> tuple[float | None, int]:
    """(median realised / predicted decrease, steps whose own batch's loss rose)."""
    import torch
    import train
    from watch_runs import start_run

    spec, model, opt = start_run(arch, recipe_name, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    ratios, rose = [], 0
    for x, y in train.batches(spec.task, seed, steps):
        loss = train.criterion(spec.task, model(x), y)
        if not math.isfinite(float(loss.detach())):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in params]
        opt.step()
        with torch.no_grad():
            predicted = sum(float((g * (p - b)).sum())
                            for g, p, b in zip(grads, params, before, strict=True))
            after = float(train.criterion(spec.task, model(x), y))
        change = after - float(loss.detach())
        if not math.isfinite(change):
            break
        rose += change > 0
        if predicted < 0:
            ratios.append(change / predicted)
    return (statistics.median(ratios) if ratios else None), rose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    import torch
    from watch_runs import outcomes

    torch.set_num_threads(1)
    for (arch, recipe, seed), known in outcomes().items():
        if (args.archs and arch not in args.archs) or seed >= args.seeds:
            continue
        median, rose = regime(arch, recipe, seed, args.steps)
        shown = "-" if median is None else f"{median:.3f}"
        print(f"{arch:26s} {recipe:5s} {seed} failed={known['failed']!s:5s} "
              f"before={known['status']:9s} r_median={shown:>8s} steps_that_rose={rose}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
