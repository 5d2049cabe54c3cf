"""Agreement of the static estimate with the probe, node by node, for every sample model.

For each model in ``sample_models/`` (and, with ``--hf``, the Hugging Face examples in
``examples/``), run ``gradscope.analyze`` on the CPU with the probe, and compare each
layer's ``static_grad_rms`` (predicted, no backward pass) with its ``probe_grad_rms``
(measured). A layer is compared when both are present, finite and > 0. The figure is
``|log10(static / probe)|``; a model passes when the median over its layers is at most
0.3 (a factor of 2), the bar set in issue 3.

Run from the repository root::

    python benchmarks/agreement.py               # sample models; exit 1 if any fails
    python benchmarks/agreement.py --hf          # also examples/hf_*.py (HF_HUB_OFFLINE=1)
    python benchmarks/agreement.py --json agreement.json

Deterministic: every model file seeds itself and the probe uses ``seed=0``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gradscope.api import analyze  # noqa: E402
from gradscope.loading import load_target  # noqa: E402

THRESHOLD = 0.3
HF_EXAMPLES = ("hf_gpt2.py", "hf_bert.py", "hf_llama.py")


@dataclass
class Row:
    """One model's line of the table."""

    model: str
    group: str
    method: str | None
    compared: int
    layers: int
    median: float | None
    p90: float | None
    worst_layer: str | None
    worst_log_ratio: float | None
    passed: bool
    seconds: float
    error: str | None = None
    #: Why the row does not count towards the target (it is still shown).
    excluded: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _usable(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def compare(path: Path, group: str) -> Row:
    """Analyse one model file and summarise static vs probe agreement."""
    start = time.perf_counter()
    try:
        target = load_target(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = analyze(target.model, target.inputs, device="cpu", probe=True, seed=0,
                             name=target.name)
    except Exception as exc:  # noqa: BLE001 - a failing model is a row, not a crash
        return Row(model=path.name, group=group, method=None, compared=0, layers=0,
                   median=None, p90=None, worst_layer=None, worst_log_ratio=None,
                   passed=False, seconds=time.perf_counter() - start,
                   error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    logs: list[tuple[float, str]] = []
    for layer in report.layers:
        s, p = layer.static_grad_rms, layer.probe_grad_rms
        if _usable(s) and _usable(p):
            assert s is not None and p is not None
            logs.append((math.log10(s / p), f"{layer.name} ({layer.op})"))
    if not logs:
        return Row(model=path.name, group=group, method=report.model.trace.method,
                   compared=0, layers=len(report.layers), median=None, p90=None,
                   worst_layer=None, worst_log_ratio=None, passed=False, seconds=seconds,
                   error="no layer has both a static and a probe gradient")
    errors = [abs(v) for v, _ in logs]
    median = percentile(errors, 0.5)
    worst_value, worst_name = max(logs, key=lambda item: abs(item[0]))
    excluded = None
    if report.probe.nonfinite_forward is not None:
        # The loss itself is NaN: there is no finite gradient for the estimate to match,
        # and the probe's values upstream of the NaN are sampling accidents (log's 1/x).
        excluded = (f"forward is non-finite from node {report.probe.nonfinite_forward}: "
                    "no gradient to compare")
    return Row(model=path.name, group=group, method=report.model.trace.method,
               compared=len(logs), layers=len(report.layers), median=median,
               p90=percentile(errors, 0.9), worst_layer=worst_name,
               worst_log_ratio=worst_value, passed=median <= THRESHOLD, seconds=seconds,
               excluded=excluded)


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def render(rows: list[Row]) -> str:
    """The table, as Markdown (readable in a terminal too)."""
    head = ("| model | trace | compared | median | p90 | worst layer | worst log10 | result |",
            "|---|---|---|---|---|---|---|---|")
    lines = list(head)
    for r in rows:
        result = "n/a" if r.excluded else \
            "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        compared = f"{r.compared}/{r.layers}"
        lines.append(f"| {r.model} | {r.method or '-'} | {compared} | {_fmt(r.median)} | "
                     f"{_fmt(r.p90)} | {r.worst_layer or '-'} | "
                     f"{_fmt(r.worst_log_ratio, signed=True)} | {result} |")
    notes = [f"{r.model}: {r.error or r.excluded}" for r in rows if r.error or r.excluded]
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", action="store_true",
                        help="also run examples/hf_gpt2.py, hf_bert.py, hf_llama.py "
                             "(needs transformers; HF_HUB_OFFLINE=1 is set for you)")
    parser.add_argument("--json", metavar="PATH", help="write the table as JSON to PATH")
    parser.add_argument("--only", nargs="*", metavar="FILE",
                        help="only these model files (names as in sample_models/)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # thread count changes float summation order: keep it fixed
    paths = [(p, "sample") for p in sorted((ROOT / "sample_models").glob("*.py"))]
    if args.hf:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        paths += [(ROOT / "examples" / name, "hf") for name in HF_EXAMPLES]
    if args.only:
        wanted = set(args.only)
        paths = [(p, g) for p, g in paths if p.name in wanted or p.stem in wanted]

    rows: list[Row] = []
    for path, group in paths:
        rows.append(compare(path, group))
        print(f"  {path.name}: {rows[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    print(render(rows))
    failed = [r.model for r in rows if r.group == "sample" and not r.passed and not r.excluded]
    print()
    print(f"threshold: median |log10(static/probe)| <= {THRESHOLD}; "
          f"{sum(r.passed for r in rows)}/{len(rows)} pass"
          + (f"; failing sample models: {', '.join(failed)}" if failed else ""))
    if args.json:
        payload: dict[str, Any] = {
            "threshold": THRESHOLD, "torch": torch.__version__,
            "rows": [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
