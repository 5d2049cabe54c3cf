"""Run under torchrun by tests/test_distributed.py: the distributed probe of each model.

    torchrun --nproc-per-node 2 tests/workers/distributed_probe.py CASES.json OUT.json

``CASES.json`` lists models: ``{"sample": NAME}`` (built on meta, as the CLI does with
--distributed) or ``{"spec": REPR}`` (a generated model from tests/strategies.py, real
weights). Every process analyses each with ``distributed=True``; rank 0 also runs the
in-memory probe of the same weights (the sample materialised as the distributed probe
draws it) and writes, per case, the largest relative difference of any probe figure, or
the error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gradscope  # noqa: E402
from gradscope.loading import load_target  # noqa: E402
from gradscope.streaming import materialise_all  # noqa: E402


def _pair(case: dict[str, str]) -> tuple[object, object]:
    if "sample" in case:
        path = str(HERE.parent.parent / "sample_models" / f"{case['sample']}.py")
        loaded = load_target(path, meta=True, values=True)
        loss = loaded.loss_fn or "dot"
        spread = gradscope.analyze(loaded.model, loaded.inputs, distributed=True,
                                   declared=loaded.declared, loss=loss)
        if dist.get_rank() != 0:
            return spread, None
        plain = load_target(path, meta=True, values=True)
        materialise_all(plain.model)
        return spread, gradscope.analyze(plain.model, plain.inputs, tracer="runtime", loss=loss)
    import strategies
    from strategies import build

    spec = eval(case["spec"], vars(strategies))  # our own repr (tests/strategies.py)
    model, inputs = build(spec)
    spread = gradscope.analyze(model, inputs, distributed=True)
    if dist.get_rank() != 0:
        return spread, None
    return spread, gradscope.analyze(model, inputs, tracer="runtime")


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    from test_stream import assert_same_probe

    results = []
    for case in cases:
        try:
            spread, plain = _pair(case)
            if plain is not None:
                results.append({"case": case, "compared": assert_same_probe(spread, plain)})
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            results.append({"case": case, "error": f"{type(exc).__name__}: {exc}"})
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
