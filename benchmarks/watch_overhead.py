"""What ``gradscope.watch`` costs a training loop (issue 18: <= 1.2x recording every 10th step).

    python benchmarks/watch_overhead.py                # every model
    python benchmarks/watch_overhead.py mlp cnn        # some
    python benchmarks/watch_overhead.py --steps 100 --every 10 --horizon 100

For each model, in one process with one torch thread: ``--steps`` steps of a plain training
loop (forward, cross-entropy, zero_grad, backward, SGD with momentum, ``float(loss)`` as
loops that log do), and the same loop under ``gradscope.watch(every=..., horizon=...)``
with ``watch.loss(loss)`` every step. Each variant starts from a copy of the same model and
runs on the same batches; the two alternate for ``--rounds`` rounds (3) and the ratio is
of the medians. The watched loop's time includes ``watch.report()`` (judging the steps and
building the report), which a user pays once.

Models: a width-256 ReLU MLP of depth 8 (batch 128), a ResNet-style CNN (batch 16 x 3 x
32 x 32), a 4-layer Pre-LN Transformer encoder (d 128, batch 8 x 64) and a 2-layer LSTM
language model (hidden 256, batch 16 x 32).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class _LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        self.lstm = nn.LSTM(128, 256, 2, batch_first=True)
        self.head = nn.Linear(256, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out).reshape(-1, 1000)


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(7):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(), *[_Block(64) for _ in range(4)], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True,
                                       norm_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                         nn.Flatten(), nn.Linear(128 * 64, 10))


#: name -> (build, batch maker, targets maker)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor],
                        Callable[[torch.Generator], torch.Tensor]]] = {
    "mlp": (_mlp, lambda g: torch.randn(128, 256, generator=g),
            lambda g: torch.randint(0, 10, (128,), generator=g)),
    "cnn": (_cnn, lambda g: torch.randn(16, 3, 32, 32, generator=g),
            lambda g: torch.randint(0, 10, (16,), generator=g)),
    "encoder": (_encoder, lambda g: torch.randn(8, 64, 128, generator=g),
                lambda g: torch.randint(0, 10, (8,), generator=g)),
    "lstm_lm": (_LM, lambda g: torch.randint(0, 1000, (16, 32), generator=g),
                lambda g: torch.randint(0, 1000, (16 * 32,), generator=g)),
}


def _loop(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
          watched: bool, every: int, horizon: int) -> float:
    import gradscope

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    if watched:
        with gradscope.watch(model, opt, every=every, horizon=horizon) as watch:
            for x, y in batches:
                loss = nn.functional.cross_entropy(model(x), y)
                watch.loss(loss)
                float(loss.detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
        watch.report()
    else:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def measure(name: str, steps: int, every: int, horizon: int, rounds: int) -> dict[str, float]:
    build, make_x, make_y = MODELS[name]
    torch.manual_seed(0)
    model = build()
    gen = torch.Generator().manual_seed(1)
    batches = [(make_x(gen), make_y(gen)) for _ in range(steps)]
    _loop(copy.deepcopy(model), batches[:3], False, every, horizon)  # warm both paths
    _loop(copy.deepcopy(model), batches[:3], True, every, horizon)
    plain, watched = [], []
    for _ in range(rounds):
        plain.append(_loop(copy.deepcopy(model), batches, False, every, horizon))
        watched.append(_loop(copy.deepcopy(model), batches, True, every, horizon))
    p, w = statistics.median(plain), statistics.median(watched)
    return {"plain_s": p, "watched_s": w, "ratio": w / p}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"models (default: all of {sorted(MODELS)})")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.names or list(MODELS):
        row = {"model": name, **measure(name, args.steps, args.every, args.horizon,
                                        args.rounds)}
        rows.append(row)
        print(f"{name:8s} plain {row['plain_s']:7.3f} s  watched {row['watched_s']:7.3f} s  "
              f"= {row['ratio']:.3f}x", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
