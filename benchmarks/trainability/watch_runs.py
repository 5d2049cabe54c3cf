"""Watch the first steps of every run of the trainability benchmark (issue 18).

    HF_HUB_OFFLINE=1 python benchmarks/trainability/watch_runs.py            # every run
    HF_HUB_OFFLINE=1 python benchmarks/trainability/watch_runs.py --markdown docs/watch.md
    HF_HUB_OFFLINE=1 python benchmarks/trainability/watch_runs.py mlp8_relu --seeds 1

For every architecture, recipe and seed of the trainability benchmark, the run's own first
``--horizon`` steps (50) are trained again exactly as ``train.train`` trains them (same
model, optimizer, learning rate and batches) under ``gradscope.watch`` (every 10th step
recorded), and the rules over steps judge them. Whether the full 300-step run failed, and
whether the before-training analysis called it unhealthy, come from docs/trainability.md's
"Every run" table (that benchmark's own result), so only the 50 watched steps are trained
here.

Scored: of the failed runs the before-training analysis missed (not "unhealthy"), the share
the watch flags (a warning or error finding), and of the runs that trained, the share it
flags (false alarms). ``--dump FILE`` keeps every record (``gradscope.steps.TrainingRecord``
as JSON), which the rules can judge again without training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

TABLE = HERE.parent.parent / "docs" / "trainability.md"


def outcomes(path: Path = TABLE) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(arch, recipe, seed) -> failed / status of the 300-step run, from its table."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    started = False
    for line in path.read_text().splitlines():
        if line.startswith("| architecture | task | recipe | seed"):
            started = True
            continue
        if not started or not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        arch, task, recipe, seed, figure, failed, status = cells[:7]
        out[(arch, recipe, int(seed))] = {"task": task, "failed": failed == "yes",
                                          "status": status, "figure": figure}
    return out


def start_run(arch: str, recipe_name: str, seed: int) -> tuple[Any, Any, Any]:
    """(the architecture's spec, its model, its optimizer) as ``train.train`` starts the run."""
    import models
    import torch
    import train

    spec = models.BY_NAME[arch]
    recipe = {r.name: r for r in train.recipes(spec.task)}[recipe_name]
    torch.manual_seed(seed)
    model = spec.build()
    model.train()
    return spec, model, train.make_optimizer(recipe, model, recipe.lr)


def watched_run(arch: str, recipe_name: str, seed: int, horizon: int, every: int,
                replay: bool = False) -> dict[str, Any]:
    """Train the run's first ``horizon`` steps under the watch; the record as a dict.

    ``replay``: the watch tries its loop advice on copies trained on the same batches."""
    import torch
    import train

    import gradscope

    spec, model, opt = start_run(arch, recipe_name, seed)
    batches = train.batches(spec.task, seed, horizon)

    def again(copy: torch.nn.Module, step: int) -> torch.Tensor:
        x, y = batches[step]
        return train.criterion(spec.task, copy(x), y)

    start = time.perf_counter()
    with gradscope.watch(model, opt, every=every, horizon=horizon, name=arch,
                         replay=again if replay else None) as watch:
        for x, y in batches:
            loss = train.criterion(spec.task, model(x), y)
            watch.loss(loss)
            if not math.isfinite(float(loss.detach())):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    report = watch.report()
    return {"record": watch.record.to_dict(), "report": report.to_dict(),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=50)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--dump", type=Path, default=None, help="write every record here")
    parser.add_argument("--judge", type=Path, default=None,
                        help="judge the records of an earlier --dump again (no training)")
    parser.add_argument("--replay", action="store_true",
                        help="verify the watch's loop advice on copies, then train each "
                        "flagged failed run for its full 300 steps with the first advice "
                        "(benchmarks/trainability/run.py's cache)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    table = outcomes()
    rows = []
    if args.judge:
        rows = judged(args.judge)
    for (arch, recipe, seed), known in ([] if args.judge else table.items()):
        if (args.archs and arch not in args.archs) or seed >= args.seeds:
            continue
        result = watched_run(arch, recipe, seed, args.horizon, args.every, args.replay)
        findings = result["report"]["findings"]
        advice = next((r for f in findings for r in f["recommendations"] if r.get("action")),
                      None)
        retrained = None
        if args.replay and advice is not None:
            import run

            retrained = run.cached_train(arch, recipe, seed, {"action": advice["action"]})
        flagged = [f"{f['rule']}{f['severity'][0].upper()}" for f in findings
                   if f["severity"] in ("error", "warning")]
        rows.append({"arch": arch, "recipe": recipe, "seed": seed, **known,
                     "flags": flagged, "all": [f"{f['rule']}{f['severity'][0].upper()}"
                                               for f in findings],
                     "seconds": result["seconds"], "record": result["record"],
                     "advice": advice, "retrained": retrained})
        after = "" if retrained is None else (
            f" advice={advice['action']['op']} -> failed={retrained.get('failed')} "
            f"({retrained.get('metric')})")
        print(f"{arch:26s} {recipe:5s} {seed} failed={known['failed']!s:5s} "
              f"before={known['status']:9s} watch={','.join(rows[-1]['all']) or '-'}{after}",
              flush=True)
    missed = [r for r in rows if r["failed"] and r["status"] != "unhealthy"]
    trained = [r for r in rows if not r["failed"]]
    caught = [r for r in missed if r["flags"]]
    alarms = [r for r in trained if r["flags"]]
    print(f"missed by the before-training analysis: {len(missed)}, caught by the watch: "
          f"{len(caught)}; runs that trained: {len(trained)}, flagged: {len(alarms)}")
    print(frontier_line(rows))
    if args.replay:
        advised = [r for r in rows if r["failed"] and r["retrained"] is not None]
        rescued = [r for r in advised if not r["retrained"].get("failed", True)]
        worse = [r for r in rows if not r["failed"] and r["retrained"] is not None
                 and r["retrained"].get("failed", True)]
        print(f"failed runs with verified loop advice: {len(advised)}, trained with it: "
              f"{len(rescued)}; runs that trained and were advised: "
              f"{sum(1 for r in rows if not r['failed'] and r['retrained'] is not None)}, "
              f"failing with the advice: {len(worse)}")
    if args.dump:
        args.dump.write_text(json.dumps(rows))
    if args.markdown:
        args.markdown.write_text(markdown(rows, args))
    return 0


def judged(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier ``--dump``, their findings judged again by the rules as they are
    now (``gradscope.rules.steps.run_step_rules`` on each saved record)."""
    from gradscope.rules.steps import run_step_rules
    from gradscope.steps import TrainingRecord

    rows = json.loads(path.read_text())
    for row in rows:
        findings = run_step_rules(TrainingRecord.from_dict(row["record"]))
        row["flags"] = [f"{f.rule}{f.severity[0].upper()}" for f in findings
                        if f.severity in ("error", "warning")]
        row["all"] = [f"{f.rule}{f.severity[0].upper()}" for f in findings]
    return rows


#: The done-when's recall target over the failures the before-training analysis missed.
RECALL_TARGET = 0.9


def pace(row: dict[str, Any]) -> tuple[float, float] | None:
    """(relative loss fall over the watched steps, t statistic of the loss trend) of one
    run, from the figures the loss rules read (``gradscope.steps``); None without them."""
    from gradscope.steps import TrainingRecord, loss_end, loss_start, loss_trend

    record = TrainingRecord.from_dict(row["record"])
    start, end, trend = loss_start(record), loss_end(record), loss_trend(record)
    if start is None or end is None or trend is None or start == 0:
        return None
    return (start - end) / abs(start), trend[1]


def frontier(rows: list[dict[str, Any]]) -> tuple[int, int, int] | None:
    """The fewest false alarms any loss-pace rule could have while the watch reaches the
    recall target: (missed failures it would need to catch, trained runs flagged then, runs
    that trained); None when the watch already reaches the target or no choice is small
    enough to enumerate.

    A loss-pace rule flags a run whose loss fell by no more than some amount with a trend
    no more significant than some t: any such rule (any staircase in the (fall, t) plane,
    its thresholds fitted here with hindsight) that flags a missed failure also flags
    every trained run that fell less with a weaker trend. So the least false alarms for a
    set of missed failures is the union of the runs they so dominate, with the watch's own
    false alarms; the minimum over every large enough set is a bound no rule over the loss
    alone can beat on this benchmark.
    """
    import itertools

    missed = [r for r in rows if r["failed"] and r["status"] != "unhealthy"]
    need = math.ceil(RECALL_TARGET * len(missed)) - sum(1 for r in missed if r["flags"])
    uncaught = [p for p in (pace(r) for r in missed if not r["flags"]) if p is not None]
    if need <= 0 or need > len(uncaught) or math.comb(len(uncaught), need) > 100_000:
        return None
    trained = [(r, pace(r)) for r in rows if not r["failed"]]
    best = len(trained)
    for chosen in itertools.combinations(uncaught, need):
        alarms = sum(1 for r, p in trained if r["flags"] or (
            p is not None and any(p[0] <= f and p[1] >= t for f, t in chosen)))
        best = min(best, alarms)
    return need, best, len(trained)


def frontier_line(rows: list[dict[str, Any]]) -> str:
    bound = frontier(rows)
    if bound is None:
        return "loss-pace bound: not needed (target reached) or not enumerable"
    need, alarms, trained = bound
    return (f"loss-pace bound: catching {need} more missed failures by the loss's pace alone "
            f"flags at least {alarms} of {trained} trained runs ({alarms / trained:.1%})")


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    missed = [r for r in rows if r["failed"] and r["status"] != "unhealthy"]
    failed = [r for r in rows if r["failed"]]
    trained = [r for r in rows if not r["failed"]]
    caught = [r for r in missed if r["flags"]]
    alarms = [r for r in trained if r["flags"]]
    lines = ["| | runs | flagged by the watch | share |", "|---|---|---|---|",
             f"| failed, missed before training | {len(missed)} | {len(caught)} | "
             f"{len(caught) / max(len(missed), 1):.2f} |",
             f"| failed (all) | {len(failed)} | {sum(1 for r in failed if r['flags'])} | "
             f"{sum(1 for r in failed if r['flags']) / max(len(failed), 1):.2f} |",
             f"| trained (false alarms) | {len(trained)} | {len(alarms)} | "
             f"{len(alarms) / max(len(trained), 1):.2f} |", "",
             "| architecture | recipe | seed | failed | before training | watch (first "
             f"{args.horizon} steps) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['recipe']} | {r['seed']} | "
                     f"{'yes' if r['failed'] else 'no'} | {r['status']} | "
                     f"{' '.join(r['all']) or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
