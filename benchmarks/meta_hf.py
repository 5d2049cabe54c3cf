"""`gradscope analyze --meta` on Hugging Face Llama-7B against building it on meta.

    HF_HUB_OFFLINE=1 python benchmarks/meta_hf.py            # 3 interleaved runs each
    HF_HUB_OFFLINE=1 python benchmarks/meta_hf.py --repeat 5

Issue 15's target: the whole `gradscope analyze FILE --meta` process at most 1.5 times a
process that imports torch and transformers and builds the same model on the meta device
(no weight is allocated in either). The model is ``LlamaForCausalLM`` of the 7B
configuration (32 layers, d 4096, MLP 11008, 32 heads, vocabulary 32000), built from its
config with nothing downloaded; the example input is 1 x 128 token ids. Each run is a
fresh process; the two commands alternate, and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_FILE = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    return LlamaForCausalLM(config)


def example_inputs():
    return torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(0))
'''

BASELINE = '''
import sys
import torch
sys.path.insert(0, {folder!r})
import llama7b
with torch.device("meta"):
    llama7b.build_model()
'''


def _timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    return time.perf_counter() - start, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    cli = shutil.which("gradscope") or str(Path(sys.executable).with_name("gradscope"))
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "llama7b.py"
        model.write_text(MODEL_FILE)
        base_cmd = [sys.executable, "-c", BASELINE.format(folder=folder)]
        cli_cmd = [cli, "analyze", str(model), "--meta", "--format", "json"]
        bases, clis = [], []
        doc = None
        for _ in range(args.repeat):
            seconds, done = _timed(base_cmd)
            if done.returncode != 0:
                print(done.stderr[-2000:])
                return 1
            bases.append(seconds)
            seconds, done = _timed(cli_cmd)
            if done.returncode == 2:
                print(done.stderr[-2000:])
                return 1
            clis.append(seconds)
            doc = json.loads(done.stdout)
    base, ours = statistics.median(bases), statistics.median(clis)
    assert doc is not None
    findings = ", ".join(f"{f['rule']} {f['severity']}" for f in doc["findings"])
    print(f"baseline (import, build on meta): {base:.2f} s  {[round(b, 2) for b in bases]}")
    print(f"gradscope analyze --meta:         {ours:.2f} s  {[round(c, 2) for c in clis]}")
    print(f"ratio {ours / base:.2f}x (target <= 1.5); traced with "
          f"{doc['model']['trace']['method']}; status {doc['status']}; {findings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
