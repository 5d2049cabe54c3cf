"""Does gradscope's verdict predict which runs fail, and does its advice make them train?

    HF_HUB_OFFLINE=1 python benchmarks/trainability/run.py                 # all, 2 seeds
    HF_HUB_OFFLINE=1 python benchmarks/trainability/run.py --markdown docs/trainability.md
    HF_HUB_OFFLINE=1 python benchmarks/trainability/run.py mlp20_sigmoid char_lstm --seeds 1

For every architecture of ``models.py``, every recipe of its task (``train.recipes``) and
every seed: build the model from the seed, analyse it with gradscope (the recipe's
optimizer, learning rate and planned steps, the task's real loss on the run's own first
batches), train it for 300 steps, and judge the run by the failure definition of
``train.py`` (written before any of this ran). Then every recommendation of the report
that carries an ``action`` is applied by code (``gradscope.fixes.apply`` for changes of
the model, the training loop for learning rate, warmup and clipping) to the same initial
model and trained again with the same recipe, seed and batches.

Scored per recipe: the confusion matrix of "gradscope says unhealthy" (an error finding)
against "the run failed"; for the advice, the share of failing runs each kind rescues and
the share of trained runs it makes worse (``train.worse``). Training runs are cached under
``benchmarks/trainability/.cache/`` by what determines them (architecture, recipe, seed and
the change), so a rerun after a change of gradscope re-trains only what the new advice asks.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from gradscope.fixes import LOOP_OPS  # noqa: E402 - the repository's own, first on the path

#: Where finished training runs are kept (the tests point it at a temporary folder).
CACHE = Path(os.environ.get("GRADSCOPE_TRAINABILITY_CACHE", HERE / ".cache"))


def _cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return CACHE / f"{digest}.json"


def cached_train(arch: str, recipe_name: str, seed: int, change: dict[str, Any] | None,
                 ) -> dict[str, Any]:
    """Train (arch, recipe, seed) with ``change`` applied (None: as built), cached."""
    import models
    import torch
    import train

    key: dict[str, Any] = {"arch": arch, "recipe": recipe_name, "seed": seed, "change": change,
                           "v": 1}
    if change is not None and (change.get("action") or {}).get("op") not in LOOP_OPS:
        # Re-initialisations draw from the run's seed, as the trial in analyze() did.
        key["apply_seed"] = seed
    path = _cache_path(key)
    if path.exists():
        return json.loads(path.read_text())["outcome"]  # type: ignore[no-any-return]
    spec = models.BY_NAME[arch]
    recipe = {r.name: r for r in train.recipes(spec.task)}[recipe_name]
    torch.manual_seed(seed)
    model = spec.build()
    schedule = train.Schedule(recipe.lr)
    error = None
    if change is not None:
        action = change.get("action") or {}
        op = action.get("op")
        if op == "learning_rate":
            schedule = train.Schedule(float(action["lr"]))
        elif op == "warmup":
            schedule = train.Schedule(recipe.lr, warmup=int(action["steps"]),
                                      warmup_start=float(action.get("start_factor", 0.1)))
        elif op == "clip_grad_norm":
            schedule = train.Schedule(recipe.lr, clip=float(action["max_norm"]))
        else:
            import gradscope.fixes

            try:
                model = gradscope.fixes.apply(model, change, seed=seed)
            except Exception as exc:  # noqa: BLE001 - a fix that cannot apply is a result
                error = f"{type(exc).__name__}: {exc}"
    if error is not None:
        return {"error": error}  # not cached: the next version of gradscope may apply it
    outcome = train.train(spec.task, model, recipe, seed, schedule).to_dict()
    CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps({"key": key, "outcome": outcome}))
    return outcome


def analyse(arch: str, recipe_name: str, seed: int) -> dict[str, Any]:
    """gradscope's report (as JSON) on the run's initial model with the run's settings."""
    import models
    import torch
    import train

    import gradscope

    spec = models.BY_NAME[arch]
    recipe = {r.name: r for r in train.recipes(spec.task)}[recipe_name]
    torch.manual_seed(seed)
    model = spec.build()
    real = train.batches(spec.task, seed, 3)
    x0, y0 = real[0]
    kwargs: dict[str, Any] = {}
    if "example_batches" in inspect.signature(gradscope.analyze).parameters:
        kwargs["example_batches"] = [((x,), y) for x, y in real]

        def loss(output: Any, inputs: Any, target: Any = None) -> Any:
            return train.criterion(spec.task, output, y0 if target is None else target)
    else:
        def loss(output: Any, inputs: Any) -> Any:  # type: ignore[misc]
            return train.criterion(spec.task, output, y0)
    start = time.perf_counter()
    report = gradscope.analyze(model, (x0,), device="cpu", optimizer=recipe.optimizer,
                               lr=recipe.lr, steps=recipe.steps, loss=loss, seed=seed,
                               **kwargs)
    doc = report.to_dict()
    doc["_seconds"] = time.perf_counter() - start
    return doc


def job(arch: str, recipe_name: str, seed: int) -> dict[str, Any]:
    """One run: analysis, the plain training run, and every recommendation applied."""
    import torch

    torch.set_num_threads(1)
    try:
        doc = analyse(arch, recipe_name, seed)
    except Exception as exc:  # noqa: BLE001 - a crash of the analysis is a result
        doc = {"status": "crash", "findings": [], "error": f"{type(exc).__name__}: {exc}"}
    base = cached_train(arch, recipe_name, seed, None)
    fixes = []
    seen: set[str] = set()
    for finding in doc.get("findings", []):
        for rec in finding.get("recommendations", []):
            action = rec.get("action")
            if not action:
                continue
            ident = json.dumps(action, sort_keys=True)
            if ident in seen:
                continue
            seen.add(ident)
            change = {"kind": rec["kind"], "action": action, "targets": rec.get("targets", []),
                      "text": rec["text"], "code": rec.get("code")}
            fixes.append({"rule": finding["rule"], "severity": finding["severity"],
                          "kind": rec["kind"], "action": action,
                          "outcome": cached_train(arch, recipe_name, seed, change)})
    return {"arch": arch, "recipe": recipe_name, "seed": seed, "status": doc.get("status"),
            "error": doc.get("error"), "seconds": doc.get("_seconds"),
            "findings": [{"rule": f["rule"], "severity": f["severity"],
                          "message": f["message"]} for f in doc.get("findings", [])],
            "base": base, "fixes": fixes,
            # The per-layer figures the verdict read, for studying misses without re-running.
            "layers": [{k: layer.get(k) for k in _LAYER_KEYS} for layer in doc.get("layers", [])
                       if layer.get("param_grad_ratio") is not None
                       or layer.get("health_class") in ("warn", "bad")]}


_LAYER_KEYS = ("name", "module", "op", "health", "health_class", "param_grad_ratio",
               "update_ratio", "dead_fraction", "saturated_fraction")


def _job(args: tuple[str, str, int]) -> dict[str, Any]:
    return job(*args)


# -- scoring ---------------------------------------------------------------------------------

def _failed(outcome: dict[str, Any]) -> bool:
    return bool(outcome.get("failed", True))


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    import models
    import train

    by_recipe: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    advice: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    first_fix: dict[str, list[str]] = defaultdict(list)
    for r in results:
        label = f"{r['arch']}/{r['recipe']}/s{r['seed']}"
        task = models.BY_NAME[r["arch"]].task
        failed = _failed(r["base"])
        flagged = r["status"] == "unhealthy"
        cell = ("tp" if flagged else "fn") if failed else ("fp" if flagged else "tn")
        by_recipe[r["recipe"]][cell].append(label)
        if r["status"] == "crash":
            by_recipe[r["recipe"]]["crash"].append(label)
        model_fixes = []
        for fix in r["fixes"]:
            group = "loop" if fix["action"]["op"] in LOOP_OPS else "model"
            out = fix["outcome"]
            name = f"{label} {fix['rule']} {fix['action']['op']}"
            if "error" in out:
                advice[group]["error"].append(f"{name}: {out['error']}")
                continue
            if group == "model":
                model_fixes.append((fix, out))
            if fix["action"]["op"] == "learning_rate":
                lr = float(fix["action"]["lr"])
                base_lr = {x.name: x for x in train.recipes(task)}[r["recipe"]].lr
                if not base_lr / 100 * (1 - 1e-9) <= lr <= base_lr * 100 * (1 + 1e-9):
                    advice[group]["out_of_range"].append(name)
            if failed:
                advice[group]["given_failed"].append(name)
                if not _failed(out):
                    advice[group]["rescued"].append(name)
            else:
                advice[group]["given_trained"].append(name)
                base = train.Outcome(**r["base"])
                if train.worse(task, base, train.Outcome(**out)):
                    advice[group]["worsened"].append(name)
        if failed and flagged:
            if model_fixes:
                fix, out = model_fixes[0]
                first_fix["given"].append(label)
                if not _failed(out):
                    first_fix["rescued"].append(label)
            else:
                first_fix["none"].append(label)
    summary: dict[str, Any] = {"recipes": {}, "advice": {}, "first_fix": {}}
    for recipe, cells in sorted(by_recipe.items()):
        tp, fp, fn, tn = (len(cells[k]) for k in ("tp", "fp", "fn", "tn"))
        summary["recipes"][recipe] = {
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": tp / (tp + fp) if tp + fp else math.nan,
            "recall": tp / (tp + fn) if tp + fn else math.nan,
            "false_positives": cells["fp"], "misses": cells["fn"], "crashes": cells["crash"]}
    for group, cells in sorted(advice.items()):
        gf, gt = len(cells["given_failed"]), len(cells["given_trained"])
        summary["advice"][group] = {
            "given_failed": gf, "rescued": len(cells["rescued"]),
            "given_trained": gt, "worsened": len(cells["worsened"]),
            "rescue_rate": len(cells["rescued"]) / gf if gf else math.nan,
            "worsen_rate": len(cells["worsened"]) / gt if gt else math.nan,
            "worsened_runs": cells["worsened"], "errors": cells["error"],
            "out_of_range": cells["out_of_range"],
            "not_rescued": sorted(set(cells["given_failed"]) - set(cells["rescued"]))}
    given = len(first_fix["given"])
    summary["first_fix"] = {"given": given, "rescued": len(first_fix["rescued"]),
                            "rate": len(first_fix["rescued"]) / given if given else math.nan,
                            "flagged_failures_without_fix": first_fix["none"]}
    return summary


def _pct(x: float) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"


def markdown(results: list[dict[str, Any]], summary: dict[str, Any], command: str) -> str:
    import models
    import train

    lines = ["# Trainability: does the verdict predict failure, does the advice rescue it?", "",
             "Produced by:", "", f"    {command}", "",
             (__doc__ or "").split("\n\n", 2)[2].strip(), "",
             "## Failure definition (fixed before gradscope ran)", "",
             (train.__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "Recipes: " + "; ".join(
                 f"{task}: " + ", ".join(f"{r.name} ({r.optimizer} lr {r.lr:g}, {r.steps} "
                                         "steps)" for r in train.recipes(task))
                 for task in ("digits", "chars")) + ".", "",
             "## Verdicts per recipe", "",
             "Predicted failure = an error finding (status unhealthy).", "",
             "| recipe | runs | failed | TP | FP | FN | TN | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe, s in summary["recipes"].items():
        runs = s["tp"] + s["fp"] + s["fn"] + s["tn"]
        lines.append(f"| {recipe} | {runs} | {s['tp'] + s['fn']} | {s['tp']} | {s['fp']} | "
                     f"{s['fn']} | {s['tn']} | {_pct(s['precision'])} | {_pct(s['recall'])} |")
    lines += ["", "## Advice applied by code and retrained", "",
              "| advice | given on failed runs | rescued | rate | given on trained runs | "
              "made worse | rate |", "|---|---|---|---|---|---|---|"]
    for group, s in summary["advice"].items():
        title = {"model": "model changes (gradscope.fixes.apply)",
                 "loop": "learning rate, warmup, clipping"}[group]
        lines.append(f"| {title} | {s['given_failed']} | {s['rescued']} | "
                     f"{_pct(s['rescue_rate'])} | {s['given_trained']} | {s['worsened']} | "
                     f"{_pct(s['worsen_rate'])} |")
    ff = summary["first_fix"]
    lines += ["", f"First model change of each flagged failure (what a user tries first): "
              f"{ff['rescued']} of {ff['given']} rescued ({_pct(ff['rate'])}); flagged "
              "failures with no applicable model change: "
              f"{len(ff['flagged_failures_without_fix'])}.", ""]
    for recipe, s in summary["recipes"].items():
        for what in ("false_positives", "misses", "crashes"):
            if s[what]:
                lines.append(f"- {recipe} {what.replace('_', ' ')}: {', '.join(s[what])}")
    for group, s in summary["advice"].items():
        for what in ("worsened_runs", "not_rescued", "errors", "out_of_range"):
            if s[what]:
                lines.append(f"- {group} advice, {what.replace('_', ' ')}: "
                             f"{'; '.join(s[what])}")
    lines += ["", "## Every run", "",
              "| architecture | task | recipe | seed | test figure | failed | status | "
              "findings | advice applied -> outcome |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        task = models.BY_NAME[r["arch"]].task
        base = r["base"]
        fig = "NaN" if base.get("metric") is None else f"{base['metric']:.3f}"
        codes = " ".join(sorted({f"{f['rule']}{f['severity'][0].upper()}"
                                 for f in r["findings"]}))
        applied = []
        for fix in r["fixes"]:
            out = fix["outcome"]
            if "error" in out:
                applied.append(f"{fix['action']['op']}: error")
            else:
                m = "NaN" if out.get("metric") is None else f"{out['metric']:.3f}"
                applied.append(f"{fix['action']['op']} -> {m}{' fail' if out['failed'] else ''}")
        lines.append(f"| {r['arch']} | {task} | {r['recipe']} | {r['seed']} | {fig} | "
                     f"{'yes' if base['failed'] else 'no'} | {r['status']} | {codes} | "
                     f"{'; '.join(applied)} |")
    lines.append("")
    lines.append("Test figure: accuracy (digits) or test cross-entropy in nats (chars; the "
                 "unigram model's is the baseline). Codes: rule and severity initial (E, W, I).")
    return "\n".join(lines) + "\n"


def _mark(outcome: dict[str, Any]) -> str:
    if "error" in outcome:
        return "err"
    return "F" if outcome["failed"] else "ok"


def main(argv: list[str] | None = None) -> int:
    import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", help="architectures (default: all)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--recipes", default=None, help="comma-separated recipe names")
    parser.add_argument("--markdown", default=None, help="write the report here")
    parser.add_argument("--json", default=None, help="write every run's record here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import train

    names = args.archs or [a.name for a in models.ARCHS]
    wanted = set(args.recipes.split(",")) if args.recipes else None
    work = [(name, r.name, seed) for name in names
            for r in train.recipes(models.BY_NAME[name].task)
            if wanted is None or r.name in wanted for seed in range(args.seeds)]
    results = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=4) as pool:
        for res in pool.imap(_job, work):
            results.append(res)
            base = res["base"]
            fig = "NaN" if base.get("metric") is None else f"{base['metric']:.3f}"
            codes = " ".join(f"{f['rule']}{f['severity'][0].upper()}" for f in res["findings"])
            fixes = " ".join(f"{f['action']['op']}:{_mark(f['outcome'])}" for f in res["fixes"])
            print(f"{res['arch']:26s} {res['recipe']:4s} s{res['seed']} {fig:>6s} "
                  f"{'FAIL' if base['failed'] else 'ok  '} {res['status']:9s} {codes} | {fixes}",
                  flush=True)
    summary = score(results)
    print(json.dumps({k: v for k, v in summary.items()}, indent=1, default=str)[:6000])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        command = "HF_HUB_OFFLINE=1 python benchmarks/trainability/run.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(markdown(results, summary, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
