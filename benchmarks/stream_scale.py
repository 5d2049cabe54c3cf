"""The streamed probe (``--stream``) on a Llama-2-7B-shaped decoder: wall time and peak RSS.

The decoder is ``meta_scale.build_decoder`` (plain torch, 6.74e9 parameters, 27 GB in
float32), input 1 x 32 token ids. In a fresh subprocess::

    gradscope analyze <model file> --stream --format json     (the CLI, end to end)

with the model file written here (``build_model()`` = the decoder, ``example_inputs()``
= the token ids). Its peak RSS (``ru_maxrss`` of the child, read by the parent with
``resource.RUSAGE_CHILDREN``) is compared with issue 17's target, 4 GB on a 24 GB,
2-core machine, and with the RSS of a subprocess that only imports torch and gradscope,
measured in the same run. ``--batches`` is passed through (the default, 3 probe batches,
materialises every block 6 times).

Run from the repository root::

    python benchmarks/stream_scale.py                  # 7B, default probe batches
    python benchmarks/stream_scale.py --config tiny    # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET = 4e9
SEQ_LEN = 32

_MODEL = """
    import sys
    import torch
    sys.path.insert(0, {bench!r})
    from meta_scale import CONFIGS, build_decoder

    def build_model():
        return build_decoder(CONFIGS[{config!r}])

    def example_inputs():
        return torch.randint(0, CONFIGS[{config!r}].vocab, (1, {seq}),
                             generator=torch.Generator().manual_seed(0))
"""


def _run(cmd: list[str], timeout: float) -> tuple[float, int, str]:
    """(wall s, peak RSS bytes of the child, stdout) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: findings at the --fail-on level
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("run the baseline first: RUSAGE_CHILDREN keeps the largest child")
    return wall, int(peak) * 1024, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="7b", help="meta_scale configuration (7b, tiny)")
    parser.add_argument("--batches", type=int, default=None, help="probe batches (default 3)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    base_wall, base_rss, _ = _run([sys.executable, "-c", "import torch, gradscope"], 600)
    print(f"baseline (import torch, gradscope): wall {base_wall:.1f} s, peak RSS "
          f"{base_rss / 1e9:.2f} GB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"llama_{args.config}.py"
        path.write_text(textwrap.dedent(_MODEL.format(bench=str(ROOT / "benchmarks"),
                                                      config=args.config, seq=SEQ_LEN)))
        cmd = [sys.executable, "-m", "gradscope", "analyze", str(path), "--stream",
               "--format", "json", "--fail-on", "never", "--quiet"]
        if args.batches is not None:
            cmd += ["--batches", str(args.batches)]
        wall, rss, out = _run(cmd, args.timeout)
    report = json.loads(out)
    probe = report["probe"]
    notes = [n for n in report["notes"] if n.startswith("--stream")]
    print(f"{args.config}: {report['model']['num_parameters']:.3g} parameters, "
          f"{probe['batches']} probe batch(es) of 1 x {SEQ_LEN} tokens on {probe['device']}")
    print(f"  gradscope analyze --stream: wall {wall:.0f} s, peak RSS {rss / 1e9:.2f} GB "
          f"({(rss - base_rss) / 1e9:.2f} GB above the baseline); target <= "
          f"{RSS_TARGET / 1e9:.0f} GB: {'met' if rss <= RSS_TARGET else 'MISSED'}")
    print(f"  findings: {', '.join(sorted({f['rule'] for f in report['findings']})) or 'none'}")
    for note in notes:
        print(f"  {note}")
    print(json.dumps({"config": args.config, "wall_s": wall, "peak_rss": rss,
                      "baseline_rss": base_rss, "baseline_wall_s": base_wall}))
    return 0 if rss <= RSS_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
