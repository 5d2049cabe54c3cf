"""How much of a re-initialisation's effect is the draw? One run, one change, several draws.

    HF_HUB_OFFLINE=1 python benchmarks/trainability/draws.py rnn_tanh_pixels sgd 1
    HF_HUB_OFFLINE=1 python benchmarks/trainability/draws.py char_rnn_tanh sgd 1 --draws 6

A random re-initialisation (Kaiming, orthogonal recurrent matrices) is a draw: the
trainability benchmark applies it with the run's seed, the draw gradscope's trial measured.
For one (architecture, recipe, seed) this script analyses the model as ``run.py`` does,
takes the first recommendation whose action is ``--op`` and applies it with seeds
0..draws-1; for each draw it prints the trial's 30-step figure (the one gradscope's
``trial`` reads: the share of the starting loss removed at the given rate on the run's
batches) and the 300-step run's test figure, against the unchanged model's.

It answers one question of ``docs/trainability.md``: when a change offered on a run that
trained makes that run worse, is it the change or the draw?
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch")
    parser.add_argument("recipe")
    parser.add_argument("seed", type=int)
    parser.add_argument("--op", default="orthogonal_recurrent", help="the action's op")
    parser.add_argument("--draws", type=int, default=6)
    args = parser.parse_args(argv)

    import models
    import torch
    import train

    import gradscope
    from gradscope.fixes import apply
    from gradscope.lr_range import run_range_test

    torch.set_num_threads(1)
    spec = models.BY_NAME[args.arch]
    recipe = {r.name: r for r in train.recipes(spec.task)}[args.recipe]
    torch.manual_seed(args.seed)
    model = spec.build()
    real = train.batches(spec.task, args.seed, 3)
    batches = [((x,), y) for x, y in real]

    def loss(output: Any, inputs: Any, target: Any = None) -> Any:
        return train.criterion(spec.task, output, real[0][1] if target is None else target)

    report = gradscope.analyze(copy.deepcopy(model), batches[0][0], device="cpu",
                               optimizer=recipe.optimizer, lr=recipe.lr, steps=recipe.steps,
                               loss=loss, seed=args.seed, example_batches=batches)
    doc = report.to_dict()
    print("findings:", " ".join(f"{f['rule']}:{f['severity']}" for f in doc["findings"]))
    recs = [r for f in doc["findings"] for r in f["recommendations"]
            if (r.get("action") or {}).get("op") == args.op]
    if not recs:
        print(f"no recommendation with op {args.op!r}")
        return 1

    def short(m: torch.nn.Module) -> float:
        test = run_range_test(m, batches, loss, recipe.lr, recipe.optimizer, steps=30,
                              seed=args.seed, factors=(1.0,))
        assert test.given is not None
        return test.given.drop

    def full(m: torch.nn.Module) -> dict[str, Any]:
        return train.train(spec.task, m, recipe, args.seed, train.Schedule(recipe.lr)).to_dict()

    figure = "test accuracy" if spec.task == "digits" else "test cross-entropy (nats)"
    base = full(copy.deepcopy(model))
    print(f"{'':10s} {'30-step drop':>12s}  300-step {figure}")
    print(f"{'unchanged':10s} {short(model):12.3f}  {base['metric']:.3f}"
          f"{'  failed' if base['failed'] else ''}")
    for draw in range(args.draws):
        changed = apply(copy.deepcopy(model), recs[0], seed=draw)
        out = full(copy.deepcopy(changed))
        worse = train.worse(spec.task, train.Outcome(**base), train.Outcome(**out))
        print(f"draw {draw:<5d} {short(changed):12.3f}  {out['metric']:.3f}"
              f"{'  failed' if out['failed'] else ''}{'  worse' if worse else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
