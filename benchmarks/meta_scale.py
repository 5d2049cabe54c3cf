"""Static analysis of Llama-2-shaped decoders on the meta device: wall time and peak RSS.

A Llama-2 decoder is written below in plain torch: token embedding, N decoder
blocks (hand-written RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight``, attention
with q/k/v/o ``Linear(bias=False)`` and ``F.scaled_dot_product_attention(is_causal=True)``,
optional grouped-query attention, SwiGLU MLP gate/up/down, residual adds), a
final RMSNorm and the ``lm_head``. Rotary embeddings are left out: they rotate
pairs of features (an orthogonal map, gain 1) and would add only routing ops.

Each configuration is analysed with
``gradscope.analyze(factory, (token_ids,), meta=True, probe=False)``, token ids
of shape (1, 128) int64 on the CPU, in a fresh subprocess, so its peak RSS
(``ru_maxrss``) is its own. The baseline, measured in the same run, is a
subprocess that only does ``import torch, gradscope``.

Run from the repository root::

    python benchmarks/meta_scale.py                 # 7B and 70B
    python benchmarks/meta_scale.py --configs 7b --json meta.json

Targets (issue 3): 7B under 30 s with peak RSS under 1.5 GB; 70B under 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
VOCAB = 32000
#: (time target in s, RSS target in bytes or None) per configuration, from issue 3.
TARGETS: dict[str, tuple[float, float | None]] = {"7b": (30.0, 1.5e9), "70b": (180.0, None)}


@dataclass(frozen=True)
class Shape:
    """Decoder hyper-parameters."""

    layers: int
    dim: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB
    eps: float = 1e-5


CONFIGS: dict[str, Shape] = {
    # Llama-2-7B: multi-head attention, 6.74e9 parameters.
    "7b": Shape(layers=32, dim=4096, hidden=11008, heads=32, kv_heads=32),
    # Llama-2-70B: grouped-query attention with 8 key/value heads, 6.90e10 parameters.
    "70b": Shape(layers=80, dim=8192, hidden=28672, heads=64, kv_heads=8),
    # Small shapes for a quick check of the script itself.
    "tiny": Shape(layers=2, dim=64, hidden=172, heads=4, kv_heads=2, vocab=256),
}


# ---------------------------------------------------------------------------
# The model (imports torch lazily so the parent process stays light)


def build_decoder(shape: Shape) -> Any:
    """A Llama-2-shaped decoder in plain torch; call under ``torch.device("meta")``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class Attention(nn.Module):
        def __init__(self, s: Shape) -> None:
            super().__init__()
            self.heads, self.kv_heads = s.heads, s.kv_heads
            self.head_dim = s.dim // s.heads
            self.q_proj = nn.Linear(s.dim, s.heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(s.dim, s.kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(s.dim, s.kv_heads * self.head_dim, bias=False)
            self.o_proj = nn.Linear(s.heads * self.head_dim, s.dim, bias=False)

        def _kv(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
            x = x.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            if self.kv_heads == self.heads:
                return x
            group = self.heads // self.kv_heads
            x = x[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim)
            return x.reshape(b, self.heads, t, self.head_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = self._kv(self.k_proj(x), b, t)
            v = self._kv(self.v_proj(x), b, t)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, d))

    class MLP(nn.Module):
        def __init__(self, s: Shape) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(s.dim, s.hidden, bias=False)
            self.up_proj = nn.Linear(s.dim, s.hidden, bias=False)
            self.down_proj = nn.Linear(s.hidden, s.dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self, s: Shape) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm(s.dim, s.eps)
            self.self_attn = Attention(s)
            self.post_attention_layernorm = RMSNorm(s.dim, s.eps)
            self.mlp = MLP(s)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Decoder(nn.Module):
        def __init__(self, s: Shape) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(s.vocab, s.dim)
            self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
            self.norm = RMSNorm(s.dim, s.eps)
            self.lm_head = nn.Linear(s.dim, s.vocab, bias=False)

        def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed_tokens(token_ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    return Decoder(shape)


def count_params(s: Shape) -> int:
    """Parameters of the decoder, from the shape alone."""
    head_dim = s.dim // s.heads
    attn = 2 * s.dim * s.heads * head_dim + 2 * s.dim * s.kv_heads * head_dim
    mlp = 3 * s.dim * s.hidden
    return s.layers * (attn + mlp + 2 * s.dim) + 2 * s.vocab * s.dim + s.dim


# ---------------------------------------------------------------------------
# Workers (run in fresh subprocesses)


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux


def worker_baseline() -> dict[str, Any]:
    start = time.perf_counter()
    import torch  # noqa: F401

    import gradscope  # noqa: F401

    return {"import_s": time.perf_counter() - start, "peak_rss": _peak_rss_bytes()}


def worker_config(name: str, profile: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    import torch

    import gradscope

    import_s = time.perf_counter() - start
    shape = CONFIGS[name]
    token_ids = torch.randint(0, shape.vocab, (1, SEQ_LEN),
                              generator=torch.Generator().manual_seed(0))

    def run() -> Any:
        return gradscope.analyze(lambda: build_decoder(shape), (token_ids,), meta=True,
                                 probe=False)

    begin = time.perf_counter()
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        report = profiler.runcall(run)
        profiler.dump_stats(profile)
    else:
        report = run()
    analyze_s = time.perf_counter() - begin
    trace = report.model.trace
    summary = report.summary
    return {
        "import_s": import_s, "analyze_s": analyze_s, "peak_rss": _peak_rss_bytes(),
        "params": report.model.num_parameters, "nodes": trace.num_nodes,
        "layers": len(report.layers), "method": trace.method, "coverage": trace.coverage,
        "unknown_ops": list(trace.unknown_ops),
        "static_min_ratio": summary.get("static_min_ratio"),
        "static_max_ratio": summary.get("static_max_ratio"),
        "findings": sorted({f.rule for f in report.findings}) if report.findings else [],
    }


# ---------------------------------------------------------------------------
# Parent


def spawn(args: list[str], timeout: float) -> dict[str, Any]:
    """Run this script as a worker in a fresh interpreter; wall time is measured outside."""
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["7b", "70b"], choices=sorted(CONFIGS),
                        help="configurations to run (default: 7b 70b)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--profile", metavar="DIR",
                        help="write a cProfile dump per configuration to DIR/<config>.prof")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds allowed per configuration subprocess")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.worker == "baseline":
            out = worker_baseline()
        else:
            out = worker_config(args.worker, args.profile)
        print(json.dumps(out))
        return 0

    baseline = spawn(["--worker", "baseline"], args.timeout)
    print(f"baseline (import torch, gradscope): wall {baseline['wall_s']:.2f} s "
          f"(import {baseline['import_s']:.2f} s), peak RSS {_mb(baseline['peak_rss'])}")
    results: dict[str, dict[str, Any]] = {}
    failed = False
    for name in args.configs:
        extra = ["--profile", str(Path(args.profile) / f"{name}.prof")] if args.profile else []
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        res = spawn(["--worker", name, *extra], args.timeout)
        results[name] = res
        shape = CONFIGS[name]
        time_target, rss_target = TARGETS.get(name, (None, None))
        print()
        print(f"{name}: {shape.layers} layers, d {shape.dim}, MLP {shape.hidden}, "
              f"{shape.heads} heads ({shape.kv_heads} kv), {res['params']:.3g} parameters "
              f"(expected {count_params(shape):.3g})")
        print(f"  trace {res['method']}, {res['nodes']} graph nodes ({res['layers']} layers "
              f"reported), coverage {res['coverage']:.1%}, unknown ops: "
              f"{', '.join(res['unknown_ops']) or 'none'}")
        print(f"  static min/max ratio {res['static_min_ratio']}, {res['static_max_ratio']}; "
              f"findings: {', '.join(res['findings']) or 'none'}")
        print(f"  analyze {res['analyze_s']:.2f} s; process wall {res['wall_s']:.2f} s "
              f"= {res['wall_s'] / baseline['wall_s']:.1f}x baseline")
        print(f"  peak RSS {_mb(res['peak_rss'])} = {res['peak_rss'] / baseline['peak_rss']:.2f}x "
              f"baseline; above baseline {_mb(res['peak_rss'] - baseline['peak_rss'])}")
        if time_target is not None:
            ok_time = res["wall_s"] < time_target
            line = f"  target: wall < {time_target:.0f} s: {'met' if ok_time else 'MISSED'}"
            ok_rss = True
            if rss_target is not None:
                ok_rss = res["peak_rss"] < rss_target
                line += f"; peak RSS < {_mb(rss_target)}: {'met' if ok_rss else 'MISSED'}"
            print(line)
            failed |= not (ok_time and ok_rss)
    if args.json:
        payload = {"seq_len": SEQ_LEN, "baseline": baseline, "configs": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
