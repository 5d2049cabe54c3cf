"""Probe overhead on CPU: time and peak memory against a bare forward+backward.

Two models are written below in plain torch:

- ``gpt2``: a GPT-2-small-sized decoder (12 blocks, d 768, 12 heads, MLP 3072,
  vocabulary 50257, learned positions, pre-LayerNorm, tanh GELU,
  ``F.scaled_dot_product_attention(is_causal=True)``, ``lm_head`` tied to the
  token embedding; no dropout), 124M parameters, on token ids of shape
  (``--gpt2-batch``, ``--gpt2-seq``), by default (4, 128);
- ``resnet``: a ResNet-18-like CNN (7x7 stride-2 stem, max-pool, 4 stages of
  2 basic blocks with BatchNorm and in-place ReLU, 64 to 512 channels, 1x1
  projection shortcuts, global average pool, 1000-way head), 11.7M parameters,
  on an input of shape (``--resnet-batch``, 3, ``--resnet-size``,
  ``--resnet-size``), by default (16, 3, 128, 128).

The bare pass is ``loss = (model(x) * r).sum()`` with a fixed random ``r``
(drawn once, outside the timed region), then
``torch.autograd.grad(loss, parameters)``, in train mode: the probe's default
loss, and the parameter gradients it asks autograd for (the probe also asks for
the input's gradient, for floating inputs).

Measured, per model, with one torch thread by default (``--threads``): the two
cores are shared, and with two threads every small op waits for a descheduled
thread, which inflates the probe's many small reductions far more than the
bare pass's large matrix products.

1. time, in one fresh subprocess: the probe's cost per batch is
   ``gradscope.probe.run_probe(model, traced, inputs, "cpu", batches=1)``
   after tracing once with ``gradscope.tracing.trace_model`` (so it also
   carries the once-per-call work: the weight norms, the report's sums).
   Bare and probe passes are interleaved after a warm-up of each (neighbours
   on the shared machine slow both alike); the median and the minimum of
   ``--repeat`` runs are reported, and the ratio of medians is checked.
   ``run_probe(batches=3)`` is timed too, as a per-batch cross-check;
2. ``gradscope.analyze(model, inputs, device="cpu")`` end to end with default
   settings (3 probe batches), in the same subprocess: the median of
   ``--analyze-repeat`` calls interleaved with bare passes, in units of the
   median bare pass; also its first call in the process (lazy torch imports,
   fake-tensor set-up), reported but not checked;
3. peak memory: each of one bare pass, three bare passes in a row,
   ``run_probe(batches=1)``, ``run_probe(batches=3)`` and ``analyze`` runs in
   its own fresh subprocess, after imports and building the model and inputs
   (``before``: ``ru_maxrss`` then). The bare and probe workers also run
   ``trace_model`` first (the probe needs it; the bare worker runs it too, so
   both passes start from the same process state), then the peak is reset to
   the current RSS (Linux ``clear_refs``) and the pass's own peak RSS above
   that is compared with the bare pass's. ``analyze`` traces inside, so its
   figure is above ``before``.

Targets (issue 4): probe time per batch <= 1.5x bare; probe peak memory <= 1.5x
bare; ``analyze`` <= N + 2 = 5 bare passes. The exit status is 1 if one is
missed.

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
    size = args.resnet_size
    x = torch.randn(args.resnet_batch, 3, size, size, generator=gen)
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

    timings: dict[str, list[float]] = {"bare": [], "probe": [], "probe3": [], "analyze": []}

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

    def probe3() -> None:
        run_probe(model, traced, inputs, "cpu", batches=DEFAULT_BATCHES)

    timed(None, probe)  # warm-up
    for _ in range(args.repeat):
        timed("bare", bare)
        timed("probe", probe)
    for _ in range(args.analyze_repeat):
        timed("bare", bare)
        timed("probe3", probe3)
        timed("analyze", lambda: gradscope.analyze(model, inputs, device="cpu"))
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(gradscope.analyze, model, inputs, device="cpu")
        profiler.dump_stats(str(Path(args.profile) / f"{name}.prof"))
    return {
        "desc": desc, "threads": torch.get_num_threads(), "method": traced.method,
        "nodes": traced.graph.number_of_nodes(),
        "params": sum(p.numel() for p in dict.fromkeys(model.parameters())),
        "trace_s": trace_s, "analyze_cold_s": analyze_cold,
        "timings": timings,
    }


def worker_memory(name: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one kind of pass in this fresh process (see the module docstring).

    ``before``: peak after imports, building the model and inputs and drawing the
    bare loss's direction; ``trace_peak``: after ``trace_model`` (not for
    ``analyze``); ``start``: the RSS the peak was reset to; ``after``: the peak.
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
    if kind in ("bare", "bare3"):
        for _ in range(3 if kind == "bare3" else 1):
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
    med = {k: statistics.median(v) for k, v in t.items()}
    low = {k: min(v) for k, v in t.items()}
    bare = med["bare"]
    time_ratio = med["probe"] / bare
    probe3_ratio = med["probe3"] / DEFAULT_BATCHES / bare
    analyze_ratio = med["analyze"] / bare
    cold_ratio = tim["analyze_cold_s"] / bare
    print(f"{name}: {tim['desc']}")
    print(f"  {tim['params'] / 1e6:.1f}M parameters; traced with {tim['method']}, "
          f"{tim['nodes']} graph nodes; {tim['threads']} torch thread(s)")
    print("  time (median, min of runs; ratios of medians):")
    print(f"    bare fwd+bwd        {bare:8.3f} s {low['bare']:8.3f} s  ({len(t['bare'])} runs)")
    print(f"    probe, 1 batch      {med['probe']:8.3f} s {low['probe']:8.3f} s  "
          f"({len(t['probe'])} runs) = {time_ratio:.2f}x bare "
          f"(min/min {low['probe'] / low['bare']:.2f}x)")
    print(f"    probe, 3 batches    {med['probe3']:8.3f} s {low['probe3']:8.3f} s  "
          f"({len(t['probe3'])} runs) = {probe3_ratio:.2f}x bare per batch")
    print(f"    trace_model         {tim['trace_s']:8.3f} s  (once) = "
          f"{tim['trace_s'] / bare:.2f} bare passes")
    print(f"    analyze (N=3)       {med['analyze']:8.3f} s {low['analyze']:8.3f} s  "
          f"({len(t['analyze'])} runs) = {analyze_ratio:.2f} bare passes")
    print(f"    analyze, 1st call   {tim['analyze_cold_s']:8.3f} s  = {cold_ratio:.2f} bare "
          f"passes (lazy torch imports included)")
    base = mem["bare"]["after"] - mem["bare"]["start"]
    reset = all(m["reset"] for m in mem.values())
    print(f"  peak RSS, fresh process each (after imports and build: "
          f"{_mb(mem['bare']['before'])}); 'pass': above the RSS just before it"
          f"{'' if reset else ' (peak not resettable here: above the build peak)'}:")
    ratios: dict[str, float] = {}
    for kind, label in (("bare", "bare fwd+bwd"), ("bare3", "bare, 3 in a row"),
                        ("probe1", "probe, 1 batch"), ("probe3", "probe, 3 batches"),
                        ("analyze", "analyze (N=3)")):
        m = mem[kind]
        first = m["start"] if kind != "analyze" else m["before"]
        own = m["after"] - first
        ratios[kind] = own / base if base > 0 else float("nan")
        line = f"    {label:18s} {_mb(own):>9s} = {ratios[kind]:.2f}x bare"
        if "trace_peak" in m and kind.startswith("probe"):
            line += f"  (trace_model before it: +{_mb(m['trace_peak'] - m['before'])})"
        if kind == "analyze":
            line += "  (above 'after imports and build'; tracing and its imports included)"
        print(line)
    verdicts = {
        "probe_time": time_ratio <= TIME_TARGET,
        "probe_memory": ratios["probe1"] <= MEMORY_TARGET,
        "probe3_memory": ratios["probe3"] <= MEMORY_TARGET,
        "analyze_time": analyze_ratio <= ANALYZE_TARGET,
    }
    print(f"  target: probe time per batch <= {TIME_TARGET}x bare: {time_ratio:.2f}x "
          f"(3-batch run: {probe3_ratio:.2f}x per batch): {_met(verdicts['probe_time'])}")
    print(f"  target: probe peak memory <= {MEMORY_TARGET}x bare: {ratios['probe1']:.2f}x "
          f"(1 batch): {_met(verdicts['probe_memory'])}; {ratios['probe3']:.2f}x "
          f"(3 batches): {_met(verdicts['probe3_memory'])}")
    print(f"  target: analyze <= {ANALYZE_TARGET} bare passes: {analyze_ratio:.2f}: "
          f"{_met(verdicts['analyze_time'])}")
    return {"time_ratio": time_ratio, "probe3_time_ratio_per_batch": probe3_ratio,
            "analyze_ratio": analyze_ratio, "analyze_first_call_ratio": cold_ratio,
            "memory_ratio": ratios, "met": verdicts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="models to run (default: gpt2 resnet)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved bare/probe timing runs per model (default 5)")
    parser.add_argument("--analyze-repeat", type=int, default=3,
                        help="rounds of bare pass, 3-batch probe and analyze after the first "
                             "analyze call (default 3)")
    parser.add_argument("--gpt2-batch", type=int, default=4)
    parser.add_argument("--gpt2-seq", type=int, default=128)
    parser.add_argument("--resnet-batch", type=int, default=16)
    parser.add_argument("--resnet-size", type=int, default=128,
                        help="height and width of the ResNet's input (default 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the workers (default 1; 0: torch's own choice)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds allowed per worker subprocess")
    parser.add_argument("--profile", metavar="DIR",
                        help="also run one analyze call per model under cProfile and write "
                             "DIR/<model>.prof")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        name, kind = args.worker
        out = worker_time(name, args) if kind == "time" else worker_memory(name, kind, args)
        print(json.dumps(out))
        return 0

    passthrough = ["--repeat", str(args.repeat), "--analyze-repeat", str(args.analyze_repeat),
                   "--gpt2-batch", str(args.gpt2_batch), "--gpt2-seq", str(args.gpt2_seq),
                   "--resnet-batch", str(args.resnet_batch),
                   "--resnet-size", str(args.resnet_size), "--threads", str(args.threads)]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        passthrough += ["--profile", str(Path(args.profile).resolve())]
    results: dict[str, Any] = {}
    failed = False
    for name in args.models:
        mem = {kind: spawn(["--worker", name, kind, *passthrough], args.timeout)
               for kind in ("bare", "bare3", "probe1", "probe3", "analyze")}
        tim = spawn(["--worker", name, "time", *passthrough], args.timeout)
        if results:
            print()
        summary = report(name, tim, mem)
        results[name] = {"time": tim, "memory": mem, **summary}
        failed |= not all(summary["met"].values())
    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
                   "models": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
