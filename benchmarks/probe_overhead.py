"""Probe overhead on CPU: time and peak memory against a bare forward+backward.

Two models are written below in plain torch:

- ``gpt2``: a GPT-2-small-sized decoder (12 blocks, d 768, 12 heads, MLP 3072,
  vocabulary 50257, learned positions, pre-LayerNorm, tanh GELU,
  ``F.scaled_dot_product_attention(is_causal=True)``, ``lm_head`` tied to the
  token embedding; no dropout), 124M parameters, on token ids of shape
  (``--gpt2-batch``, ``--gpt2-seq``), by default (4, 128);
- ``resnet``: a ResNet-18-like CNN (7x7 stem, max-pool, 4 stages of 2 basic
  blocks with BatchNorm and in-place ReLU, 64 to 512 channels, 1x1 projection
  shortcuts, global average pool, 1000-way head), 11.7M parameters, on an input
  of shape (``--resnet-batch``, 3, 64, 64), by default 8.

The bare pass is ``loss = (model(x) * r).sum()`` with a fixed random ``r``
(drawn once, outside the timed region), then
``torch.autograd.grad(loss, parameters)``, in train mode: the same loss the
probe uses by default, and the same gradients it asks autograd for.

Measured, per model:

1. time: the probe's cost per batch is
   ``gradscope.probe.run_probe(model, traced, inputs, "cpu", batches=1)`` after
   tracing once with ``gradscope.tracing.trace_model``. Bare and probe passes
   are interleaved after a warm-up of each (the machine is shared and noisy, so
   neighbours slow both alike); the median and the minimum of ``--repeat`` runs
   are reported, and the ratio of medians is checked;
2. memory: each of bare pass, ``run_probe(batches=1)``, ``run_probe(batches=3)``
   (trace included) and ``gradscope.analyze(model, inputs)`` runs in a fresh
   subprocess; its peak RSS above the baseline (``ru_maxrss`` after imports,
   building the model and the inputs, before the pass) is compared with the
   bare pass's;
3. ``gradscope.analyze(model, inputs, device="cpu")`` end to end with default
   settings (3 probe batches): its first call in the process (``cold``, lazy
   torch imports included) and the median of ``--analyze-repeat`` further
   calls, in units of the median bare pass, in the same timing subprocess.

Targets (issue 4): probe time per batch <= 1.5x bare; probe peak memory <= 1.5x
bare; ``analyze`` <= N + 2 = 5 bare passes.

Run from the repository root::

    python benchmarks/probe_overhead.py --json probe.json
    python benchmarks/probe_overhead.py --models resnet --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gpt2", "resnet")
#: Probe batches in ``analyze``'s default settings (issue 4: N = 3).
DEFAULT_BATCHES = 3
TIME_TARGET = 1.5
MEMORY_TARGET = 1.5
ANALYZE_TARGET = DEFAULT_BATCHES + 2


@dataclass(frozen=True)
class GPT2Shape:
    """GPT-2 small."""

    layers: int = 12
    dim: int = 768
    heads: int = 12
    hidden: int = 3072
    vocab: int = 50257
    positions: int = 1024


# ---------------------------------------------------------------------------
# The models (torch imported lazily, so the parent process stays light)


def build_gpt2(shape: GPT2Shape) -> Any:
    """A GPT-2-small-sized decoder in plain torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, s: GPT2Shape) -> None:
            super().__init__()
            self.heads = s.heads
            self.c_attn = nn.Linear(s.dim, 3 * s.dim)
            self.c_proj = nn.Linear(s.dim, s.dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q = q.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(out.transpose(1, 2).reshape(b, t, d))

    class MLP(nn.Module):
        def __init__(self, s: GPT2Shape) -> None:
            super().__init__()
            self.c_fc = nn.Linear(s.dim, s.hidden)
            self.act = nn.GELU(approximate="tanh")
            self.c_proj = nn.Linear(s.hidden, s.dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(self.act(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, s: GPT2Shape) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(s.dim)
            self.attn = Attention(s)
            self.ln_2 = nn.LayerNorm(s.dim)
            self.mlp = MLP(s)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT2(nn.Module):
        def __init__(self, s: GPT2Shape) -> None:
            super().__init__()
            self.wte = nn.Embedding(s.vocab, s.dim)
            self.wpe = nn.Embedding(s.positions, s.dim)
            self.h = nn.ModuleList(Block(s) for _ in range(s.layers))
            self.ln_f = nn.LayerNorm(s.dim)
            self.lm_head = nn.Linear(s.dim, s.vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.dim() >= 2:
                    nn.init.normal_(p, 0.0, 0.02)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.wte(ids) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    return GPT2(shape)


def build_resnet(widths: tuple[int, ...] = (64, 128, 256, 512), classes: int = 1000) -> Any:
    """A ResNet-18-like CNN in plain torch (torchvision's layout, written out)."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            stages: list[nn.Module] = []
            cin = widths[0]
            for i, width in enumerate(widths):
                stride = 1 if i == 0 else 2
                stages.append(nn.Sequential(BasicBlock(cin, width, stride),
                                            BasicBlock(width, width, 1)))
                cin = width
            self.layers = nn.Sequential(*stages)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.avgpool(self.layers(x))
            return self.fc(torch.flatten(x, 1))

    return ResNet()


def build(name: str, args: argparse.Namespace) -> tuple[Any, tuple[Any, ...], str]:
    """The model, its inputs and a one-line description; everything seeded."""
    import torch

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "gpt2":
        shape = GPT2Shape()
        model = build_gpt2(shape)
        ids = torch.randint(0, shape.vocab, (args.gpt2_batch, args.gpt2_seq), generator=gen)
        desc = (f"GPT-2-small-sized decoder: {shape.layers} layers, d {shape.dim}, "
                f"{shape.heads} heads, MLP {shape.hidden}, vocab {shape.vocab}; "
                f"token ids {tuple(ids.shape)}")
        return model, (ids,), desc
    model = build_resnet()
    x = torch.randn(args.resnet_batch, 3, 64, 64, generator=gen)
    desc = f"ResNet-18-like CNN (BatchNorm, 64-512 channels); input {tuple(x.shape)}"
    return model, (x,), desc


# ---------------------------------------------------------------------------
# Workers (run in fresh subprocesses)


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux


def _rss_bytes() -> int | None:
    """Current RSS (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _bare_pass(model: Any, inputs: tuple[Any, ...], direction: Any) -> None:
    import torch

    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    loss = (model(*inputs) * direction).sum()
    grads = torch.autograd.grad(loss, params)
    del grads


def _direction(model: Any, inputs: tuple[Any, ...]) -> Any:
    """The fixed random direction r of the bare loss, shaped like the output."""
    import torch

    with torch.no_grad():
        shape = model(*inputs).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


def worker_time(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import gradscope
    from gradscope.probe import run_probe
    from gradscope.tracing import trace_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs, desc = build(name, args)
    model.train()
    direction = _direction(model, inputs)

    def bare() -> None:
        _bare_pass(model, inputs, direction)

    timings: dict[str, list[float]] = {"bare": [], "probe": [], "analyze": []}

    def timed(key: str | None, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        if key is not None:
            timings[key].append(took)
        return took

    timed(None, bare)  # warm-up
    # First analyze in the process: what a user's single call costs, lazy imports included.
    analyze_cold = timed(None, lambda: gradscope.analyze(model, inputs, device="cpu"))
    start = time.perf_counter()
    traced = trace_model(model, inputs)
    trace_s = time.perf_counter() - start

    def probe() -> None:
        run_probe(model, traced, inputs, "cpu", batches=1)

    timed(None, probe)  # warm-up
    for _ in range(args.repeat):
        timed("bare", bare)
        timed("probe", probe)
    for _ in range(args.analyze_repeat):
        timed("bare", bare)
        timed("analyze", lambda: gradscope.analyze(model, inputs, device="cpu"))
    # run_probe with the default 3 batches once, for the per-batch figure of the real thing.
    probe3 = timed(None, lambda: run_probe(model, traced, inputs, "cpu",
                                           batches=DEFAULT_BATCHES))
    return {
        "desc": desc, "threads": torch.get_num_threads(), "method": traced.method,
        "nodes": traced.graph.number_of_nodes(),
        "params": sum(p.numel() for p in dict.fromkeys(model.parameters())),
        "trace_s": trace_s, "analyze_cold_s": analyze_cold, "probe3_s": probe3,
        "timings": timings,
    }


def worker_memory(name: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one pass in this fresh process, above the RSS just before it.

    Every kind imports, builds the model and inputs, and draws the bare loss's
    direction (``before``: the peak RSS then). Bare and probe workers then both
    run ``trace_model`` (the probe needs it; the bare worker runs it too, so the
    two passes start from the same process state: the same lazily imported torch
    modules, the same allocator heap), and the peak is reset to the current RSS
    where Linux allows it (``clear_refs``): ``after - start`` is the pass's own
    peak. ``analyze`` traces inside, so it is shown above ``before``.
    """
    import torch

    import gradscope
    from gradscope.probe import run_probe
    from gradscope.tracing import trace_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs, _ = build(name, args)
    model.train()
    direction = _direction(model, inputs)
    out: dict[str, Any] = {"before": _peak_rss_bytes()}
    traced = None
    if kind != "analyze":
        traced = trace_model(model, inputs)
        out["trace_peak"] = _peak_rss_bytes()
    out["reset"] = _reset_peak()
    start = _rss_bytes() if out["reset"] else None
    out["start"] = start if start is not None else _peak_rss_bytes()
    begin = time.perf_counter()
    if kind == "bare":
        _bare_pass(model, inputs, direction)
    elif kind in ("probe1", "probe3"):
        assert traced is not None
        run_probe(model, traced, inputs, "cpu", batches=1 if kind == "probe1" else 3)
    elif kind == "analyze":
        gradscope.analyze(model, inputs, device="cpu")
    else:
        raise ValueError(kind)
    out["s"] = time.perf_counter() - begin
    out["after"] = _peak_rss_bytes()
    return out


# ---------------------------------------------------------------------------
# Parent


def spawn(args: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(name: str, tim: dict[str, Any], mem: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print one model's figures; return them with the targets' verdicts."""
    t = tim["timings"]
    bare_med, probe_med = statistics.median(t["bare"]), statistics.median(t["probe"])
    bare_min, probe_min = min(t["bare"]), min(t["probe"])
    analyze_med = statistics.median(t["analyze"])
    time_ratio = probe_med / bare_med
    analyze_ratio = analyze_med / bare_med
    cold_ratio = tim["analyze_cold_s"] / bare_med
    print(f"{name}: {tim['desc']}")
    print(f"  {tim['params'] / 1e6:.1f}M parameters; traced with {tim['method']}, "
          f"{tim['nodes']} graph nodes; {tim['threads']} torch threads")
    print(f"  bare fwd+bwd      median {bare_med:.3f} s  min {bare_min:.3f} s  "
          f"({len(t['bare'])} runs)")
    print(f"  probe, 1 batch    median {probe_med:.3f} s  min {probe_min:.3f} s  "
          f"({len(t['probe'])} runs)  = {time_ratio:.2f}x bare (min/min "
          f"{probe_min / bare_min:.2f}x)")
    print(f"  probe, 3 batches  {tim['probe3_s']:.3f} s = {tim['probe3_s'] / 3:.3f} s/batch "
          f"= {tim['probe3_s'] / 3 / bare_med:.2f}x bare")
    print(f"  trace_model       {tim['trace_s']:.3f} s = {tim['trace_s'] / bare_med:.2f} bare "
          f"passes")
    print(f"  analyze (N=3)     median {analyze_med:.3f} s ({len(t['analyze'])} runs) = "
          f"{analyze_ratio:.2f} bare passes; first call {tim['analyze_cold_s']:.3f} s = "
          f"{cold_ratio:.2f}")
    base = mem["bare"]["after"] - mem["bare"]["start"]
    reset = all(m["reset"] for m in mem.values())
    print(f"  peak RSS, fresh process each (build baseline {_mb(mem['bare']['before'])}; "
          f"'pass' = above the RSS just before the pass"
          f"{'' if reset else ' (peak not resettable here: above the build peak)'}, "
          f"'+ build' = above the build baseline):")
    ratios, build_ratios = {}, {}
    for kind, label in (("bare", "bare fwd+bwd"), ("probe1", "probe, 1 batch"),
                        ("probe3", "probe, 3 batches"), ("analyze", "analyze (N=3)")):
        m = mem[kind]
        own, total = m["after"] - m["start"], m["after"] - m["before"]
        ratios[kind] = own / base if base > 0 else float("nan")
        build_ratios[kind] = total / base if base > 0 else float("nan")
        line = (f"    {label:17s} pass {_mb(own):>9s} = {ratios[kind]:.2f}x bare;  "
                f"+ build {_mb(total):>9s} = {build_ratios[kind]:.2f}x")
        if "trace_peak" in m:
            line += f"  (trace_model before it: {_mb(m['trace_peak'] - m['before'])})"
        print(line)
    verdicts = {
        "probe_time": time_ratio <= TIME_TARGET,
        "probe_memory": ratios["probe1"] <= MEMORY_TARGET,
        "probe3_memory": ratios["probe3"] <= MEMORY_TARGET,
        "analyze_memory": ratios["analyze"] <= MEMORY_TARGET,
        "analyze_time": analyze_ratio <= ANALYZE_TARGET,
    }
    print(f"  target: probe time per batch <= {TIME_TARGET}x bare: {time_ratio:.2f}x, "
          f"{_met(verdicts['probe_time'])}")
    print(f"  target: probe peak memory <= {MEMORY_TARGET}x bare: {ratios['probe1']:.2f}x "
          f"(1 batch), {_met(verdicts['probe_memory'])}; {ratios['probe3']:.2f}x (3 batches), "
          f"{_met(verdicts['probe3_memory'])}; analyze {ratios['analyze']:.2f}x, "
          f"{_met(verdicts['analyze_memory'])}")
    print(f"  target: analyze <= {ANALYZE_TARGET} bare passes: {analyze_ratio:.2f}, "
          f"{_met(verdicts['analyze_time'])}")
    return {"time_ratio": time_ratio, "analyze_ratio": analyze_ratio,
            "analyze_cold_ratio": cold_ratio, "memory_ratio": ratios,
            "memory_ratio_above_build": build_ratios, "met": verdicts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="models to run (default: gpt2 resnet)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved bare/probe timing runs per model (default 5)")
    parser.add_argument("--analyze-repeat", type=int, default=3,
                        help="timed analyze calls after the first (default 3)")
    parser.add_argument("--gpt2-batch", type=int, default=4)
    parser.add_argument("--gpt2-seq", type=int, default=128)
    parser.add_argument("--resnet-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the workers (default 1; 0: torch's own choice)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds allowed per worker subprocess")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        name, kind = args.worker
        out = worker_time(name, args) if kind == "time" else worker_memory(name, kind, args)
        print(json.dumps(out))
        return 0

    passthrough = ["--repeat", str(args.repeat), "--analyze-repeat", str(args.analyze_repeat),
                   "--gpt2-batch", str(args.gpt2_batch), "--gpt2-seq", str(args.gpt2_seq),
                   "--resnet-batch", str(args.resnet_batch), "--threads", str(args.threads)]
    results: dict[str, Any] = {}
    failed = False
    for name in args.models:
        mem = {kind: spawn(["--worker", name, kind, *passthrough], args.timeout)
               for kind in ("bare", "probe1", "probe3", "analyze")}
        tim = spawn(["--worker", name, "time", *passthrough], args.timeout)
        if results:
            print()
        summary = report(name, tim, mem)
        results[name] = {"time": tim, "memory": mem, **summary}
        v = summary["met"]
        failed |= not (v["probe_time"] and v["probe_memory"] and v["analyze_time"])
    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
                   "models": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
