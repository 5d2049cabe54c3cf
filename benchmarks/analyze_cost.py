"""What ``gradscope.analyze`` costs against the passes it must run (issue 15).

    HF_HUB_OFFLINE=1 python benchmarks/analyze_cost.py                 # every model
    HF_HUB_OFFLINE=1 python benchmarks/analyze_cost.py tenc12 mlp128   # some
    HF_HUB_OFFLINE=1 python benchmarks/analyze_cost.py --cli           # and the CLI

For each model, in a fresh subprocess with one torch thread: the median of 5 bare
forward+backward passes (``loss = <output, fixed random direction>``, gradients of every
parameter, train mode: what one probe batch computes), then ``gradscope.analyze`` with its
defaults (3 probe batches) called once to warm the process and timed over 3 calls (the
median). The ratio is analyze / bare; the issue's target is 5 (the 3 probe passes plus 2).

``--cli``: ``gradscope analyze FILE --format json`` end to end in a subprocess (gradscope
byte-compiled first, as an installed wheel is) against a
subprocess that imports torch, builds the same model from the same file and runs one bare
pass (the user's own cost of checking the model); target 1.5. Medians of 3, interleaved.

Models (written here in plain torch, or built from a Hugging Face config with no download):
a ResNet-style CNN, a 12-layer Pre-LN encoder, GPT-2 (6 layers), a 2-layer LSTM language
model over 64 steps, width-256 MLPs of depth 8 and 128, and a 12-layer
``nn.TransformerEncoder`` (d 128, batch 4 x 16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: A width-256 ReLU MLP of ``hidden`` + 1 weight layers, as a model file's source.
_MLP = """
    import torch
    from torch import nn

    def build_model():
        layers = []
        for _ in range({hidden}):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(256, 10))

    def example_inputs():
        return torch.randn(256, 256)
"""

#: Each model as the source of a model file: ``build_model()`` and ``example_inputs()``.
MODELS: dict[str, str] = {
    "cnn": """
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
                self.b1 = nn.BatchNorm2d(c)
                self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
                self.b2 = nn.BatchNorm2d(c)

            def forward(self, x):
                return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))

        def build_model():
            return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                 nn.ReLU(), *[Block(64) for _ in range(4)],
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

        def example_inputs():
            return torch.randn(16, 3, 32, 32)
    """,
    "preln12": """
        import torch
        from torch import nn

        class Encoder(nn.Module):
            def __init__(self, d=256, heads=4, layers=12):
                super().__init__()
                self.emb = nn.Embedding(1000, d)
                self.n1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
                self.n2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
                self.att = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True)
                                         for _ in range(layers))
                self.ff = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                                      nn.Linear(4 * d, d))
                                        for _ in range(layers))
                self.norm = nn.LayerNorm(d)
                self.head = nn.Linear(d, 1000)

            def forward(self, x):
                h = self.emb(x)
                for n1, att, n2, ff in zip(self.n1, self.att, self.n2, self.ff):
                    y = n1(h)
                    h = h + att(y, y, y, need_weights=False)[0]
                    h = h + ff(n2(h))
                return self.head(self.norm(h))

        def build_model():
            return Encoder()

        def example_inputs():
            return torch.randint(0, 1000, (8, 64))
    """,
    "gpt2_6": """
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        def build_model():
            config = GPT2Config(n_layer=6, n_embd=256, n_head=8, vocab_size=5000, n_positions=128)
            return GPT2LMHeadModel(config)

        def example_inputs():
            return torch.randint(0, 5000, (4, 128))
    """,
    "lstm_lm": """
        import torch
        from torch import nn

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(5000, 256)
                self.lstm = nn.LSTM(256, 512, 2, batch_first=True)
                self.head = nn.Linear(512, 5000)

            def forward(self, x):
                out, _ = self.lstm(self.embed(x))
                return self.head(out)

        def build_model():
            return LM()

        def example_inputs():
            return torch.randint(0, 5000, (16, 64))
    """,
    "mlp8": _MLP.format(hidden=7),
    "mlp128": _MLP.format(hidden=127),
    "tenc12": """
        import torch
        from torch import nn

        def build_model():
            layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
            return nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)

        def example_inputs():
            return torch.randn(4, 16, 128)
    """,
}

_WORKER = """
import importlib.util, statistics, sys, time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
spec = importlib.util.spec_from_file_location("m", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
model = mod.build_model(); x = mod.example_inputs()
inputs = x if isinstance(x, tuple) else (x,)
params = [p for p in model.parameters() if p.requires_grad]
model.train()
def output():
    out = model(*inputs)
    return out if torch.is_tensor(out) else out[0]
direction = torch.randn_like(output().detach())
def bare():
    torch.autograd.grad((output() * direction).sum(), params)
MODE
"""

_TIMING = """
import gradscope
bare()
bares = []
for _ in range(5):
    t = time.perf_counter(); bare(); bares.append(time.perf_counter() - t)
t = time.perf_counter()
gradscope.analyze(model, inputs, device="cpu")
first = time.perf_counter() - t
runs = []
for _ in range(3):
    t = time.perf_counter(); gradscope.analyze(model, inputs, device="cpu")
    runs.append(time.perf_counter() - t)
print(statistics.median(bares), first, statistics.median(runs))
"""


def _file(name: str, folder: Path) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(MODELS[name]))
    return path


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=str(REPO))


def api_ratio(path: Path) -> tuple[float, float, float]:
    """(bare pass s, first analyze s, median analyze s) in a fresh process."""
    code = _WORKER.replace("MODE", _TIMING)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, env=_env(), check=True, timeout=1800)
    bare, first, median = (float(v) for v in out.stdout.split()[-3:])
    return bare, first, median


def cli_ratio(path: Path, repeat: int = 3) -> tuple[float, float]:
    """(median s of the bare subprocess, median s of ``gradscope analyze``), interleaved."""
    bare_cmd = [sys.executable, "-c", _WORKER.replace("MODE", "bare()"), str(path)]
    cli_cmd = [sys.executable, "-m", "gradscope", "analyze", str(path), "--format", "json",
               "--fail-on", "never"]
    bares, clis = [], []
    for _ in range(repeat):
        for cmd, into in ((bare_cmd, bares), (cli_cmd, clis)):
            start = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=_env(), check=True, timeout=1800)
            into.append(time.perf_counter() - start)
    return statistics.median(bares), statistics.median(clis)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"models (default: all of {sorted(MODELS)})")
    parser.add_argument("--cli", action="store_true", help="also time the CLI end to end")
    args = parser.parse_args(argv)
    names = args.names or list(MODELS)
    if args.cli:
        # gradscope's modules byte-compiled, as a wheel install leaves them: an editable
        # checkout under PYTHONDONTWRITEBYTECODE=1 (this machine's setting) would compile
        # them from source in every process (0.13 s), which no installed copy does.
        import compileall

        compileall.compile_dir(str(REPO / "gradscope"), quiet=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = _file(name, Path(tmp))
            bare, first, median = api_ratio(path)
            row = {"model": name, "bare_s": bare, "analyze_s": median,
                   "ratio": median / bare, "first_call_s": first}
            if args.cli:
                cbare, ccli = cli_ratio(path)
                row.update(cli_bare_s=cbare, cli_s=ccli, cli_ratio=ccli / cbare)
            rows.append(row)
            cli = (f"  CLI {row['cli_s']:.2f} s / {row['cli_bare_s']:.2f} s = "
                   f"{row['cli_ratio']:.2f}x" if args.cli else "")
            print(f"{name:8s} bare {bare * 1e3:8.1f} ms  analyze {median:7.3f} s = "
                  f"{median / bare:6.1f}x (first call {first:.2f} s){cli}", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
