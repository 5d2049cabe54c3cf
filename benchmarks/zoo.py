"""Run gradscope on every model of the zoo and compare each verdict with the expected one.

    HF_HUB_OFFLINE=1 python benchmarks/zoo.py                  # every file, table on stdout
    HF_HUB_OFFLINE=1 python benchmarks/zoo.py --markdown       # the table of docs/zoo.md
    HF_HUB_OFFLINE=1 python benchmarks/zoo.py classic/resnet18 # some files only
    HF_HUB_OFFLINE=1 python benchmarks/zoo.py --meta hf_decoders   # --meta against real weights
    HF_HUB_OFFLINE=1 python benchmarks/zoo.py --seeds 5 classic    # verdicts over 5 seeds

Each file of ``benchmarks/zoo/<group>/<name>.py`` builds a real architecture from its
default initialisation and states ``EXPECT`` ("healthy": it trains; "unhealthy": a
known-bad variant) with ``EXPECT_RULES`` (codes a correct tool raises) and ``REASON``.
Each is analysed in its own process (``gradscope analyze FILE --format json``, one torch
thread), so a crash or a hang is one row, not the end of the run.

Scored per row:

- ``false error``: an expected-healthy model with an error finding;
- ``false warn``: an expected-healthy model with a vanishing/exploding warning (GS1xx,
  GS2xx); architecture advice (GS7xx) and trace notes are not false alarms;
- ``miss``: a known-bad model without one of its ``EXPECT_RULES`` (or not unhealthy when
  an error is expected);
- ``crash``: exit 2 or a timeout;
- ``agree``: the median |log10(static / measured)| of the gradient health over the
  layers with both figures (the issue asks for <= 0.3); "-" where the probe went
  non-finite (no measurement to compare with).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ZOO = HERE / "zoo"
REPO = HERE.parent
TIMEOUT = 300


def constants(path: Path) -> dict[str, Any]:
    """EXPECT, EXPECT_RULES and REASON of a zoo file, read without importing it."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("EXPECT", "EXPECT_RULES", "REASON"):
            with contextlib.suppress(ValueError):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def analyse(path: Path, *extra: str) -> tuple[dict[str, Any] | None, str, float]:
    """(JSON report or None, error text, seconds) of one zoo file, in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gradscope", "analyze", str(path), "--format", "json",
             "--fail-on", "never", *extra], capture_output=True, text=True, env=env,
            timeout=TIMEOUT,
            check=False)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {TIMEOUT} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, last[:200], seconds
    return json.loads(proc.stdout), "", seconds


def agreement(doc: dict[str, Any]) -> float | None:
    """Median |log10(predicted / measured)| of the health ratio over layers with both.

    None where the probe's forward or backward went non-finite: its ratios are then not
    measurements of the gradient (gradscope does not judge them either, GS501/GS502 do).
    """
    probe = doc.get("probe") or {}
    if probe.get("nonfinite_forward") or probe.get("nonfinite_backward"):
        return None
    logs = []
    for layer in doc.get("layers") or []:
        a, b = layer.get("health_predicted"), layer.get("health_measured")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0 \
                and math.isfinite(a) and math.isfinite(b):
            logs.append(abs(math.log10(a / b)))
    return statistics.median(logs) if logs else None


def score(expect: dict[str, Any], doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "crash"
    findings = doc["findings"]
    rules = {f["rule"] for f in findings}
    if expect.get("EXPECT") == "unhealthy":
        wanted = set(expect.get("EXPECT_RULES") or ())
        if wanted and not (wanted & rules):
            return "miss"
        return "ok"
    if any(f["severity"] == "error" for f in findings):
        return "false error"
    if any(f["severity"] == "warning" and f["rule"][2] in "12" for f in findings):
        return "false warn"
    return "ok"


def rows(names: list[str]) -> list[dict[str, Any]]:
    files = sorted(ZOO.glob("*/*.py"))
    if names:
        files = [f for f in files if any(f"{f.parent.name}/{f.stem}".startswith(n)
                                         for n in names)]
    out = []
    for path in files:
        expect = constants(path)
        doc, error, seconds = analyse(path)
        findings = doc["findings"] if doc else []
        out.append({
            "model": f"{path.parent.name}/{path.stem}",
            "expect": expect.get("EXPECT", "?"),
            "status": doc["status"] if doc else "crash",
            "findings": ", ".join(f"{f['rule']}{f['severity'][0].upper()}" for f in findings
                                  if f["severity"] != "info") or "-",
            "agree": agreement(doc) if doc else None,
            "score": score(expect, doc),
            "seconds": seconds,
            "error": error,
        })
        print(f"{out[-1]['model']:<36} {out[-1]['score']:<12} {out[-1]['status']:<10} "
              f"{out[-1]['findings']}", file=sys.stderr, flush=True)
    return out


def meta_table(names: list[str]) -> str:
    """--meta's static figure against the real weights' (both without the probe)."""
    files = [f for f in sorted(ZOO.glob("*/*.py"))
             if any(f"{f.parent.name}/{f.stem}".startswith(n) for n in names or ["hf_"])]
    lines = ["| model | static, real weights | static, --meta | meta / real |",
             "|---|---|---|---|"]
    for path in files:
        real, _, _ = analyse(path, "--no-probe")
        meta, _, _ = analyse(path, "--meta")
        a = (real or {}).get("summary", {}).get("static_min_ratio")
        b = (meta or {}).get("summary", {}).get("static_min_ratio")
        factor = f"{b / a:.2f}" if a and b else "-"
        lines.append(f"| {path.parent.name}/{path.stem} | {a if a is None else f'{a:.3g}'} | "
                     f"{b if b is None else f'{b:.3g}'} | {factor} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


#: One seeded run in a fresh process: the file's SEED (its initialisation) and the probe
#: seed both set to the seed, then the analysis as ``gradscope analyze`` runs it.
_SEEDED = """
import importlib.util, json, sys
import gradscope
path, seed = sys.argv[1], int(sys.argv[2])
spec = importlib.util.spec_from_file_location("zoo_model", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.SEED = seed  # the files seed their build with this constant
report = gradscope.analyze(module.build_model(), module.example_inputs(), device="cpu",
                           seed=seed, loss=getattr(module, "loss_fn", None) or "dot")
print(json.dumps(report.to_dict()))
"""


def seed_table(names: list[str], seeds: int) -> str:
    """Verdict and score of each model over ``seeds`` initialisation and probe seeds."""
    files = sorted(ZOO.glob("*/*.py"))
    if names:
        files = [f for f in files if any(f"{f.parent.name}/{f.stem}".startswith(n)
                                         for n in names)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    lines = ["| model | expect | " + " | ".join(f"seed {s}" for s in range(seeds))
             + " | stable |", "|---|---|" + "---|" * (seeds + 1)]
    unstable = 0
    for path in files:
        expect = constants(path)
        cells = []
        for seed in range(seeds):
            proc = subprocess.run([sys.executable, "-c", _SEEDED, str(path), str(seed)],
                                  capture_output=True, text=True, env=env, timeout=TIMEOUT,
                                  check=False)
            doc = json.loads(proc.stdout) if proc.returncode == 0 else None
            status = doc["status"] if doc else "crash"
            codes = ",".join(sorted({f["rule"] + f["severity"][0].upper()
                                     for f in (doc or {}).get("findings", [])
                                     if f["severity"] != "info"})) or "-"
            cells.append(f"{status} {score(expect, doc)} ({codes})")
        stable = len({c.split(" (")[0] for c in cells}) == 1
        unstable += not stable
        lines.append(f"| {path.parent.name}/{path.stem} | {expect.get('EXPECT', '?')} | "
                     + " | ".join(cells) + f" | {'yes' if stable else 'NO'} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"{len(files)} models; verdict or score changes with the seed: {unstable}"]
    return "\n".join(lines) + "\n"


def render(results: list[dict[str, Any]], markdown: bool) -> str:
    head = ("model", "expect", "status", "findings (E error, W warning)", "static~probe",
            "score", "s")
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        agree = "-" if r["agree"] is None else f"{r['agree']:.2f}"
        cells = (r["model"], r["expect"], r["status"], r["findings"], agree, r["score"],
                 f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells))
    counts: dict[str, int] = {}
    for r in results:
        counts[r["score"]] = counts.get(r["score"], 0) + 1
    total = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    lines += ["", f"{len(results)} models; {total}"]
    crashes = [r for r in results if r["score"] == "crash"]
    lines += [f"crash {r['model']}: {r['error']}" for r in crashes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="group/name prefixes (default: all)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    parser.add_argument("--meta", action="store_true",
                        help="compare --meta's static estimate with the real weights'")
    parser.add_argument("--seeds", type=int, default=0,
                        help="score each model over this many init and probe seeds")
    args = parser.parse_args()
    if args.seeds:
        sys.stdout.write(seed_table(args.names, args.seeds))
        return 0
    if args.meta:
        sys.stdout.write(meta_table(args.names))
        return 0
    results = rows(args.names)
    sys.stdout.write(render(results, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
