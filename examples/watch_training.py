"""Watch the first steps of a real training run with gradscope.watch.

    python examples/watch_training.py            # writes watch.html and watch.json here

A small MLP learns sklearn's bundled digits with SGD; the watch records the first 50
steps (module figures every 10th), judges them with the rules over steps and, because it
is given ``replay`` (the loss of step ``i`` on another model: the same batch, the same
loss), tries a lower learning rate, clipping and a warmup on copies of the run before it
offers any of them. Raise ``LR`` to 2.0 to see a run it flags and the advice it verifies.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import gradscope

LR = 0.1
STEPS = 80


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        batches.append((x[idx], y[idx]))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def replay(copy: nn.Module, step: int) -> torch.Tensor:
        xb, yb = batches[step]
        return nn.functional.cross_entropy(copy(xb), yb)

    with gradscope.watch(model, optimizer, every=10, horizon=50, replay=replay) as watch:
        for xb, yb in batches:  # the run goes on after the horizon; the watch stops there
            loss = nn.functional.cross_entropy(model(xb), yb)
            watch.loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    report = watch.report()
    report.write_html("watch.html")
    report.write_json("watch.json")
    print(report.status, [f"{f.rule} {f.severity}" for f in report.findings])


if __name__ == "__main__":
    main()
