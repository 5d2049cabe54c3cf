"""How the static pass scales with depth: plain Linear+ReLU MLPs of 125 to 1000 layers.

For each depth, the model is ``nn.Sequential`` of ``depth`` x (Linear(64, 64), ReLU)
(Kaiming init, seeded) and a batch of 16 inputs. Timed, each the best of
``--repeat`` runs after one warm-up (the machine is shared and noisy; the minimum
is the least disturbed run):

- trace: ``gradscope.tracing.trace_model(model, inputs, allow_run=False)``;
- estimate: ``gradscope.estimate.engine.estimate(traced, inputs)``;
- static pass: ``gradscope.analyze(model, inputs, probe=False)`` end to end
  (trace + estimate + rules + report).

Linearity: time(1000) / time(125) against nodes(1000) / nodes(125) (8x).
Target (issue 3): the 1000-layer static pass under 2 s.

Run from the repository root::

    python benchmarks/static_scaling.py
    python benchmarks/static_scaling.py --depths 125 250 500 1000 2000 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradscope.api import analyze  # noqa: E402
from gradscope.estimate.engine import estimate  # noqa: E402
from gradscope.tracing import trace_model  # noqa: E402

WIDTH = 64
BATCH = 16
TARGET_DEPTH = 1000
TARGET_S = 2.0


def build_mlp(depth: int, width: int = WIDTH) -> nn.Sequential:
    """``depth`` x (Linear(width, width), ReLU), Kaiming fan-in init, zero bias."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Minimum wall time over ``repeat`` calls (garbage collected before each), and a result."""
    times = []
    result = None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(depth: int, repeat: int) -> dict[str, Any]:
    model = build_mlp(depth)
    inputs = (torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(0)),)
    trace_s, traced = best_of(lambda: trace_model(model, inputs, allow_run=False), repeat)
    estimate_s, _ = best_of(lambda: estimate(traced, inputs), repeat)
    static_s, report = best_of(lambda: analyze(model, inputs, probe=False), repeat)
    nodes = traced.graph.number_of_nodes()
    return {"depth": depth, "nodes": nodes, "method": traced.method, "trace_s": trace_s,
            "estimate_s": estimate_s, "static_s": static_s,
            "us_per_node": static_s / nodes * 1e6, "coverage": report.model.trace.coverage}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[125, 250, 500, 1000],
                        help="numbers of Linear+ReLU layers (default: 125 250 500 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warm = build_mlp(4)
    analyze(warm, (torch.randn(BATCH, WIDTH),), probe=False)  # first-use imports and caches

    rows = []
    print("| layers | nodes | trace (s) | estimate (s) | static pass (s) | us/node |")
    print("|---|---|---|---|---|---|")
    for depth in args.depths:
        row = measure(depth, args.repeat)
        rows.append(row)
        print(f"| {depth} | {row['nodes']} | {row['trace_s']:.3f} | {row['estimate_s']:.3f} | "
              f"{row['static_s']:.3f} | {row['us_per_node']:.0f} |", flush=True)
    print()
    first, last = rows[0], rows[-1]
    node_ratio = last["nodes"] / first["nodes"]
    print(f"method {first['method']}, coverage {first['coverage']:.0%}")
    print(f"nodes({last['depth']}) / nodes({first['depth']}) = {node_ratio:.2f}")
    for key, label in (("trace_s", "trace"), ("estimate_s", "estimate"),
                       ("static_s", "static pass")):
        ratio = last[key] / first[key]
        print(f"{label}: time({last['depth']}) / time({first['depth']}) = {ratio:.2f} "
              f"({ratio / node_ratio:.2f}x linear)")
    status = 0
    target = next((r for r in rows if r["depth"] == TARGET_DEPTH), None)
    if target is not None:
        met = target["static_s"] < TARGET_S
        print(f"target: {TARGET_DEPTH}-layer static pass < {TARGET_S:.0f} s: "
              f"{target['static_s']:.2f} s, {'met' if met else 'MISSED'}")
        status = 0 if met else 1
    if args.json:
        Path(args.json).write_text(json.dumps({"width": WIDTH, "batch": BATCH, "rows": rows},
                                              indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
