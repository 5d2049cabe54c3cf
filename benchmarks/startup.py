"""Start-up time of the light commands, against a bare ``python -c pass``.

``gradscope --help``, ``--version`` and ``rules`` run in pre-commit hooks and
CI steps, often several times per commit, so they must not pay for torch (or
numpy, networkx, jinja2). Each command runs in a fresh subprocess, stdout and
stderr to ``/dev/null``, in a temporary working directory:

- ``python -c pass``: the floor, the interpreter's own start-up;
- ``python -c "import click"``: the floor of any click command line (shown,
  not a target);
- ``python -m gradscope --help`` and ``gradscope --help`` (the console script
  installed next to the interpreter);
- ``gradscope rules`` and ``gradscope --version`` (console script).

Bytecode: installed packages are byte-compiled by pip, so every command is
first run once with ``PYTHONDONTWRITEBYTECODE`` removed from the environment,
which writes the ``__pycache__`` of a source checkout too. The timed runs use
the same environment. The runs are interleaved (one of each command per
round, ``--repeat`` rounds, default 15) so that a neighbour on a shared
machine slows all of them alike; the median and the minimum are reported, and
the ratio of medians to ``python -c pass``. The CPU time (user + system) of
each child is recorded too: on a machine whose CPU quota throttles processes,
wall times come in steps of the quota's period, and the CPU time shows the work
itself.

Before timing, each gradscope command also runs once with
``PYTHONPROFILEIMPORTTIME=1`` to count the modules it imports and to check
that torch, numpy, networkx and jinja2 are not among them.

Target (issue 7): ``--help`` (both spellings) <= 2x ``python -c pass``. The
exit status is 1 if it is missed or a heavy module is imported.

Run from the repository root::

    python benchmarks/startup.py --json startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "networkx", "jinja2")
TARGET = 2.0


def commands() -> dict[str, list[str]]:
    py = sys.executable
    script = Path(py).with_name("gradscope")
    console = str(script) if script.exists() else (shutil.which("gradscope") or "")
    if not console:
        sys.exit("no gradscope console script next to the interpreter or on PATH; "
                 "pip install -e . first")
    return {
        "python -c pass": [py, "-c", "pass"],
        'python -c "import click"': [py, "-c", "import click"],
        "python -m gradscope --help": [py, "-m", "gradscope", "--help"],
        "gradscope --help": [console, "--help"],
        "gradscope rules": [console, "rules"],
        "gradscope --version": [console, "--version"],
    }


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    # python -m gradscope must find this checkout, as the console script does
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def imported_modules(argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
    proc = subprocess.run(argv, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False, timeout=120)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "imported package" not in line]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall time and the child's CPU time (user + system), in seconds."""
    cpu = _children_cpu()
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)
    return time.perf_counter() - start, _children_cpu() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="rounds (default 15)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args()

    cmds = commands()
    env = environment()
    results: dict[str, Any] = {"python": sys.version.split()[0],
                               "machine": platform.machine(), "cpus": os.cpu_count(),
                               "repeat": args.repeat, "commands": {}}
    with tempfile.TemporaryDirectory() as cwd:
        modules: dict[str, list[str]] = {}
        for name, argv in cmds.items():
            subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=120)  # writes pycs
            modules[name] = imported_modules(argv, env, cwd)
        samples: dict[str, list[float]] = {name: [] for name in cmds}
        cpu: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.repeat):
            for name, argv in cmds.items():
                wall, used = timed(argv, env, cwd)
                samples[name].append(wall)
                cpu[name].append(used)

    base = statistics.median(samples["python -c pass"])
    cpu_base = statistics.median(cpu["python -c pass"])
    failed = False
    header = (f"{'command':<30} {'median ms':>10} {'min ms':>8} {'ratio':>6} "
              f"{'CPU ms':>7} {'ratio':>6} {'modules':>8}  heavy imports")
    print(header)
    print("-" * len(header))
    for name in cmds:
        median = statistics.median(samples[name])
        heavy = sorted({m.split(".")[0] for m in modules[name]} & set(HEAVY))
        ratio = median / base
        cpu_median = statistics.median(cpu[name])
        row = {"median_s": median, "min_s": min(samples[name]), "ratio": ratio,
               "cpu_median_s": cpu_median, "cpu_ratio": cpu_median / cpu_base,
               "modules": len(modules[name]), "heavy": heavy, "samples_s": samples[name],
               "cpu_samples_s": cpu[name]}
        if name.endswith("--help"):
            row["target"] = TARGET
            row["met"] = ratio <= TARGET
            failed |= not row["met"]
        if "gradscope" in name:
            failed |= bool(heavy)
        results["commands"][name] = row
        mark = "" if "met" not in row else ("  (target <= 2x: met)" if row["met"]
                                             else "  (target <= 2x: MISSED)")
        print(f"{name:<30} {median * 1e3:>10.1f} {min(samples[name]) * 1e3:>8.1f} "
              f"{ratio:>5.2f}x {cpu_median * 1e3:>7.1f} {cpu_median / cpu_base:>5.2f}x "
              f"{len(modules[name]):>8}  {', '.join(heavy) or '-'}{mark}")
    results["met"] = not failed
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
